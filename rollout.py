"""Batched multi-turn sampling with a growing KV cache; episodes are token-in, token-out. Also the trainer's
forward over episodes (`sampled_hidden`), which runs a prompt shared by a group once.

The trainer scores exactly the ids sampled here: prompts, model turns and observations are kept as token ids
from the start (an `Episode`), never re-rendered or re-tokenized, so the sampled tokens, their positions and the
sampler's log-probs cannot drift apart from what the loss sees.

Legend: L layers, B cache rows (episodes in flight), H kv heads, D head dim, T cache columns allocated,
S columns in use after the current block, W columns in the block being written, V vocab, C hidden size,
P distinct prompts, G samples per prompt, Lp longest shared prefix.

Deliberate simplifications:
- One shared write cursor: each forward writes W columns for every row, padding columns masked out. When the
  cache is full, or finished episodes leave (at turn boundaries), each row's real columns are packed together,
  so the cache holds about as many columns as the longest episode has tokens; if still short, it doubles.
- Rows that ended their turn early ride along as masked padding until the slowest row is done (a decode step
  costs nearly the same for 8 rows as for 4); rows whose episode ended leave the batch at the turn boundary.
- An episode that would pass max_len tokens (default: the model's max_position_embeddings) is cut and flagged
  `truncated` (a cut mid-turn keeps its sampled tokens but is not sent to the env); the others go on.
  `max_turns` reached without the env being done ends the episode without `truncated`.
- Log-probs are those of the tempered model, log softmax(logits / temperature) over the full vocabulary: the
  policy that drew the tokens, and exactly what the trainer recomputes, so on-policy ratios are 1. Top-p and
  min_new_tokens only change which token is drawn (top-p < 1 is slightly off-policy).
- Observations are wrapped with pieces of the tokenizer's own chat template (`template_pieces`). The ids equal
  what the template renders for the whole conversation, except at the prompt/response boundary, where
  re-tokenizing could merge tokens differently (why nothing is re-tokenized). Templates that rewrite earlier
  turns (e.g. Qwen3 thinking) are rejected.
- `sampled_hidden` shares only whole prompts (episodes identical up to their first sampled token), one level,
  once per micro-batch. The prefix pass runs the last layer's MLP at every prefix position though only the
  last is read. Two forward calls per micro-batch cost host time: on a GPU with a small model that can eat the
  saving.
"""
import functools
import os
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.utils.rnn import pad_sequence

from model import Transformer, autocast, linear, packed_weights


class KVCache:
    """Keys/values for B rows x T columns, a per-row valid mask and next RoPE position, and one shared write
    cursor. The model calls prepare(valid) once per forward, which opens a block of W columns at the cursor, then
    update(i, k, v) once per layer, which writes layer i's keys/values into that block. T grows when full."""

    def __init__(self, config, batch, capacity, device="cpu", dtype=torch.float32):
        shape = (batch, config.n_kv_heads, capacity, config.head_dim)  # (B, H, T, D)
        # one tensor per layer: the compiled decode step writes each in place (views of one tensor would alias,
        # and compiled code would copy them); zeros, not empty: the decode step reads unwritten columns too
        # (masked, weight 0, but 0 * NaN is NaN)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]  # L x (B, H, T, D)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, T) real tokens
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) RoPE position of the next token
        self.cursor, self.block = 0, (0, 0)  # block: the columns prepare() opened, which update() fills
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # the cursor on the device, for Column

    def prepare(self, valid):
        """Open a block of W columns at the cursor for `valid` (B, W), True = real token; return its RoPE
        positions (B, W) and attention mask (B, 1, W, S), True = attend. In order: make room, record the block
        (update() writes into self.block), advance each row's next position, build the mask."""
        B, W = self.valid.shape[0], valid.shape[-1]
        if valid.ndim != 2 or valid.shape[0] != B:
            raise ValueError(f"valid must be (B={B}, W) bool, got {tuple(valid.shape)}")
        self.reserve(W)
        start, end = self.cursor, self.cursor + W
        self.cursor, self.block = end, (start, end)  # the columns update() fills, layer by layer
        self.valid[:, start:end] = valid
        pos = (self.next_pos[:, None] + valid.cumsum(1) - 1).clamp_(min=0)  # (B, W) contiguous per row
        self.next_pos += valid.sum(1)
        cols = torch.arange(end, device=valid.device)
        query_col = cols[start:, None]  # (W, 1)
        mask = (cols <= query_col) & self.valid[:, None, :end]  # (B, W, S) causal, padding keys hidden
        mask |= cols == query_col  # a query may always see itself: no fully masked row, no NaN
        return pos, mask[:, None]

    def update(self, i, k, v):
        """Store layer i's block (B, H, W, D); return its keys / values over all S columns (B, H, S, D)."""
        start, end = self.block
        self.k[i][:, :, start:end] = k
        self.v[i][:, :, start:end] = v
        return self.k[i][:, :, :end], self.v[i][:, :, :end]

    def columns(self):
        """The decode step's per-layer caches, writing at the cursor (sync the cursor back after: int(self.col))."""
        self.col.fill_(self.cursor)
        if self.col.is_cuda:  # CUDA graphs mutate inputs in place only at fixed addresses (re-recorded if they move)
            for t in self.k + self.v + [self.valid, self.next_pos, self.col]:
                torch._dynamo.mark_static_address(t)
        return [Column(k, v, self.col) for k, v in zip(self.k, self.v)]

    def reserve(self, W):
        """Room for W more columns at the cursor: when full, pack the rows' real columns, and double if still short
        (capacities stay round_up's multiples, times 2^k: few distinct shapes for the compiled decode step)."""
        B, T = self.valid.shape
        if self.cursor + W > T:
            n = int(self.valid[:, :self.cursor].sum(1).max())
            self.select(range(B), T if n + W <= T else max(2 * T, n + W))

    def select(self, rows, capacity=None):
        """Keep only `rows` (in that order; a row listed G times is forked G times) and compact: each row's real
        columns move, in order, to the end of the first n columns (n = the most real tokens of any kept row), its
        padding before them. Attention does not depend on key order and cached keys carry their RoPE positions,
        so only memory changes. capacity: columns to allocate (default: as now)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        valid = self.valid[rows, :self.cursor]  # (B', S)
        n = int(valid.sum(1).max()) if len(rows) else 0
        # a stable sort puts each row's padding first and keeps its real columns in order; keep the last n
        cols = valid.to(torch.uint8).sort(dim=1, stable=True).indices[:, valid.shape[1] - n:]  # (B', n)
        (_, H, _, D), T = self.k[0].shape, capacity or self.valid.shape[1]
        for name in ("k", "v"):
            new = [torch.zeros(len(rows), H, T, D, device=x.device, dtype=x.dtype) for x in getattr(self, name)]
            for x, old in zip(new, getattr(self, name)):
                x[:, :, :n] = old[rows[:, None], :, cols].transpose(1, 2)  # (B', n, H, D): indexed dims first
            setattr(self, name, new)
        self.valid = torch.zeros(len(rows), T, dtype=torch.bool, device=valid.device)
        self.valid[:, :n] = valid.gather(1, cols)
        self.next_pos, self.cursor = self.next_pos[rows], n


def round_up(n, to=128):
    """Cache capacities are multiples of 128 columns: few distinct shapes for the compiled decode step (on CUDA
    one graph per shape), at most 127 unused columns attended to, masked."""
    return -(-n // to) * to


class Column:
    """Layer i's cache in the decode step (Block.forward's `cache`): one new column per row, written by index at
    column `col`, a (1,) tensor (moving it needs no recompile), into a KVCache's buffers (on CUDA: all T columns,
    the fixed shapes CUDA graphs want, at the price of attending to unwritten ones, masked) or views of their first
    S columns (elsewhere: the columns written so far; S is a dynamic dimension of the compiled step)."""

    def __init__(self, k, v, col):
        self.k, self.v, self.col = k, v, col  # (B, H, T, D), (B, H, T, D), (1,)

    def update(self, i, k, v):
        """Write this layer's new column (B, H, 1, D) (i: this Column's layer); return all T columns (B, H, T, D)."""
        self.k.index_copy_(2, self.col, k)
        self.v.index_copy_(2, self.col, v)
        return self.k, self.v


def decode_step(model, cache, cols, tok, active, S=None):
    """The sampler's hot step with static shapes: write tok (B,) at column cache.col (active (B,) False: a padding
    row) and return the fp32 logits (B, V) of the next token. Transformer.forward for one column; cols: the
    layers' Columns (KVCache.columns). S: attend to the first S columns only (the sampler passes the columns written
    so far, except compiled on CUDA: a multi-turn cache is up to half unused capacity, and reading it costs as much
    as the weights); None: all T, the static shapes CUDA graphs want. Mutates cache.k / v / valid / next_pos / col
    in place."""
    T = S or cache.valid.shape[1]
    if S is not None:  # views: the writes still land in the cache
        cols = [Column(c.k[:, :, :S], c.v[:, :, :S], c.col) for c in cols]
    mask = (cache.valid[:, :T] | (torch.arange(T, device=tok.device) == cache.col))[:, None, None]  # (B, 1, 1, T)
    if tok.is_cuda and COMPILE:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the step's CUDA graph may reuse its outputs
    with autocast(tok.device):
        x = model.tok_emb(tok[:, None])  # (B, 1, C)
        cos, sin = model.rope(cache.next_pos[:, None], x)  # tok's position: next_pos (B, 1)
        x = _layers(model, x, cos, sin, mask, cols)
        h = model.norm(x)[:, -1]  # (B, C)
    cache.valid.index_copy_(1, cache.col, active[:, None])  # the mask above saw the new column anyway
    cache.next_pos += active
    cache.col += 1
    return _head(model, h)


# compile the decode step's layers (see _layers)? "auto": wherever torch.compile works. On this project's 2-core CPU
# a multi-turn rollout ran 1.10x faster than with the eager layers (same process), whose ~40 operators a layer cost
# ~16 ms a step at B = 8 in calls and small kernels; the first compile takes ~40 s there (then cached on disk).
# True / False: train.py / eval.py --compile / --no-compile, or SKILL_SD_COMPILE=1 / 0 for every process (the tests use 0)
COMPILE = {"0": False, "1": True}.get(os.environ.get("SKILL_SD_COMPILE", ""), "auto")
_compiled = None  # the compiled layers, made on first use; False once compiling failed


def _layers(model, x, cos, sin, mask, cols):
    """model.layers on x (B, 1, C) in the decode step, compiled where torch.compile works (CPU with a C++ compiler;
    CUDA, with CUDA graphs): the whole stack as one graph, as gpt-fast does (graphs per layer cost as much in calls
    as they saved). On CPU its products call model.linear's packed copies through an operator. The first failure
    (no compiler, an unsupported device) gives one warning and the eager layers from then on; fullgraph: a compile
    error surfaces before the graph runs, so nothing was written when the eager layers take over."""
    global _compiled
    if _compiles(model.layers[0], x):
        try:
            if _compiled is not None:
                return _compiled(model.layers, x, cos, sin, mask, cols)
            mode = "reduce-overhead" if x.is_cuda else None  # CUDA graphs: no kernel launch cost
            # dynamic: rows (B) and cache columns (S or T) vary between steps, turns and runs; one graph serves them
            # all (B = 1 gets its own)
            _compiled, t = torch.compile(_run_layers, fullgraph=True, dynamic=True, mode=mode), time.time()
            x = _compiled(model.layers, x, cos, sin, mask, cols)
            print(f"rollout: compiled the decode step in {time.time() - t:.0f} s (--no-compile: eager)", flush=True)
            return x
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"torch.compile failed, decoding eagerly ({type(e).__name__}: {str(e)[:200]})")
            _compiled = False
    return _run_layers(model.layers, x, cos, sin, mask, cols)


def _compiles(layer, x):
    """Does the decode step run compiled (tried, or to be tried) for input x? See COMPILE and _layers."""
    return (COMPILE is True or COMPILE == "auto") and _compiled is not False and not isinstance(layer, FSDPModule)


def _run_layers(layers, x, cos, sin, mask, cols):
    for layer, col in zip(layers, cols):
        x = layer(x, cos, sin, mask, col, None)  # the layer index: col is this layer's cache already
    return x


@dataclass
class Episode:
    tokens: list  # compact ids: prompt + model turns + observations, no padding
    mask: list  # 1 = sampled by the policy
    logprobs: list  # sampler fp32 log-prob (tempered model) at sampled positions, 0.0 elsewhere
    prompt_len: int
    turn_spans: list = field(default_factory=list)  # (start, end) of each model turn's sampled tokens
    responses: list = field(default_factory=list)  # decoded text of each model turn (what env.step got)
    observations: list = field(default_factory=list)  # [first observation, then one per env.step]
    reward: float = 0.0  # sum of env step rewards
    success: bool = False
    completion: float = 0.0
    truncated: bool = False  # cut by the context limit
    task_id: int = 0  # the env seed
    group: int = 0  # index of the prompt in `seeds`
    history: list = field(default_factory=list)  # env.history


def sample(logits, temperature=1.0, top_p=1.0, generator=None, u=None):
    """logits (B, V) fp32 -> sampled ids (B,). temperature 0 = greedy; top_p keeps the smallest set of most
    likely tokens whose mass reaches top_p (always at least one). u: optional (B,) uniforms in (0, 1] to use
    instead of drawing from `generator` (per-row generators, see _uniforms)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # mass before token >= top_p
    # inverse-CDF draw with one uniform per row from `generator` wherever it lives: a CPU generator can drive
    # CUDA sampling (train.py seeds per group on the CPU). u in (0, 1] and side "left" never pick a 0-prob token.
    if u is None:
        u = 1.0 - torch.rand(probs.shape[0], generator=generator,
                             device=generator.device if generator is not None else probs.device)
    cdf = probs.cumsum(-1)  # (B, V)
    tok = torch.searchsorted(cdf, u.to(probs.device)[:, None] * cdf[:, -1:]).clamp_(max=probs.shape[1] - 1).squeeze(1)
    return tok if order is None else order.gather(-1, tok[:, None]).squeeze(1)


def _forward_last(model, cache, idx, valid):
    """Write a (B, W) block into the cache; return fp32 logits (B, V) of each row's last column. The head runs
    on the last column only (an observation block of 100 columns would otherwise cost 100x the head)."""
    with autocast(idx.device):
        h = model(idx, cache=cache, valid=valid, return_hidden=True)[:, -1]  # (B, C)
    return _head(model, h)


def _head(model, h):
    with torch.autocast(h.device.type, enabled=False):  # fp32 head even inside a caller's bf16 autocast:
        return linear(h.float(), model.head_weight.float())  # logp_old must match the trainer's fp32 scoring


def _cache_dtype(model):
    # on CUDA the forward runs under bf16 autocast (model.autocast), so k / v arrive in bf16: store them so
    w = model.head_weight
    return torch.bfloat16 if w.device.type == "cuda" and w.dtype == torch.float32 else w.dtype


def _left_pad(seqs, pad_id, device):
    """(B, W) ids and valid mask, each row's tokens at its right end (sampling continues at a shared cursor)."""
    pad = lambda x, v: pad_sequence(x, batch_first=True, padding_value=v, padding_side="left").to(device)  # noqa: E731
    return (pad([torch.tensor(s, dtype=torch.long) for s in seqs], pad_id),
            pad([torch.ones(len(s), dtype=torch.bool) for s in seqs], False))


def _uniforms(gens, active):
    """One uniform in (0, 1] per active row, each from that row's own generator; inactive rows draw nothing. So
    an episode's samples depend only on its own generator, not on which other episodes share the batch."""
    return torch.tensor([1.0 - torch.rand(1, generator=g).item() if a else 1.0 for g, a in zip(gens, active.tolist())])


def _sample_turn(model, cache, logits, max_new, eos_id, pad_id, temperature, top_p, generator, min_new=0,
                 max_len=None):
    """Sample one turn for every row of the cache, starting from `logits` (B, V) of the last written column.
    A row stops at eos, after max_new tokens, or, `cut`, when one more token would make it longer than max_len.
    Each step's forward writes the tokens drawn in the step before, so the tokens drawn in the last step are
    NOT in the cache (`unwritten`). Returns per row: sampled ids, their log-probs, unwritten, cut (lists)."""
    B, dev = logits.shape[0], logits.device
    tok_buf = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)  # (B, N)
    logp_buf = torch.zeros(B, max_new, device=dev)  # (B, N)
    active = torch.ones(B, dtype=torch.bool, device=dev)  # drew a token this step
    n = torch.zeros(B, dtype=torch.long, device=dev)
    cut = torch.zeros(B, dtype=torch.bool, device=dev)
    eos = torch.tensor([eos_id], device=dev) if min_new else None  # once, not a host-to-device copy per step
    cache.reserve(max_new)  # room for the whole turn: the decode steps keep their shapes
    cols = cache.columns()
    static = isinstance(model, Transformer)  # other modules with the cache protocol: the general block path
    # CUDA graphs want static shapes: the compiled step attends to all T columns there; elsewhere to those written
    every = static and logits.is_cuda and _compiles(model.layers[0], logits)
    for t in range(max_new):
        scaled = logits / temperature if temperature > 0 else logits  # the policy trained is the tempered one
        lse = torch.logsumexp(scaled, -1)  # (B,)
        # forced length (benchmarks): forbid eos for the draw only
        draw = logits.index_fill(1, eos, float("-inf")) if t < min_new else logits
        u = _uniforms(generator, active).to(dev) if isinstance(generator, list) and temperature > 0 else None
        tok = torch.where(active, sample(draw, temperature, top_p, generator if u is None else None, u), pad_id)
        tok_buf[:, t] = tok
        logp_buf[:, t] = scaled.gather(1, tok[:, None]).squeeze(1) - lse
        n += active
        still = active & (tok != eos_id)
        if t + 1 == max_new:
            break
        if max_len is not None:  # a row holds next_pos written tokens + tok; going on adds one more
            cut |= still & (cache.next_pos + 2 > max_len)
            still &= ~cut
        if not still.any():
            break
        if static:  # rows done this turn: padding; column cursor + t is written in this step
            logits = decode_step(model, cache, cols, tok, active, None if every else cache.cursor + t + 1)
        else:
            logits = _forward_last(model, cache, tok[:, None], active[:, None])
            cache.col.fill_(cache.cursor)
        active = still
    cache.cursor = int(cache.col)
    tok, logp, n = tok_buf.tolist(), logp_buf.tolist(), n.tolist()
    return [tok[r][:n[r]] for r in range(B)], [logp[r][:n[r]] for r in range(B)], active.tolist(), cut.tolist()


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages, gen):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def prompt_ids(tokenizer, system_prompt, observation):
    """Token ids of an episode's prompt: [system_prompt, first observation] rendered by the chat template."""
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": observation}]
    return _encode(tokenizer, _render(tokenizer, messages, True))


def template_pieces(tokenizer, model="this model"):
    """The chat template's text around an observation: (after_eos, user_pre, user_post). A model turn that
    ended with eos is followed by after_eos + user_pre + obs + user_post (e.g. ChatML: "\\n",
    "<|im_start|>user\\n", "<|im_end|>\\n<|im_start|>assistant\\n"). Found by rendering sentinel conversations,
    so it holds for any template that renders earlier turns unchanged when a turn is appended (else ValueError)."""
    A, U = "ASSISTANT_SENTINEL_7f3a", "USER_SENTINEL_7f3a"
    base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    head = _render(tokenizer, base, True)
    closed = _render(tokenizer, base + [{"role": "assistant", "content": A}], False)
    nxt = _render(tokenizer, base + [{"role": "assistant", "content": A}, {"role": "user", "content": U}], True)
    eos = tokenizer.eos_token
    ok = closed.startswith(head + A) and nxt.startswith(closed) and nxt.count(U) == 1
    tail = closed[len(head) + len(A):]
    if not ok or not tail.startswith(eos):
        why = ("writes a <think> block into the last assistant turn only, dropping it from earlier ones once a turn "
               "is appended" if "<think>" in closed and "<think>" not in nxt else "must end an assistant turn with "
               f"eos_token ({eos!r}) and render earlier turns unchanged when a turn is appended")
        raise ValueError(f"{model}: unsupported chat template: it {why} (the sampler only appends token ids)")
    pre, post = nxt[len(closed):].split(U)
    return tail[len(eos):], pre, post


def _packing(fn):
    """fn(model, ...) with the model's weights packed for the decode step's few-row products (model.packed_weights:
    on CPU only; weights cannot change during a call, and the packed copies are dropped when it returns)."""
    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with packed_weights(model):
            return fn(model, *args, **kwargs)
    return wrapped


@torch.no_grad()
@_packing
def rollout(model, tokenizer, make_env, seeds, group_size, max_turns, max_new_tokens, temperature=1.0,
            top_p=1.0, generator=None, max_len=None, system_prompts=None, min_new_tokens=0):
    """Play P=len(seeds) tasks x G=group_size samples; returns P*G Episodes, task-major. max_len: see the module
    docstring (default and cap: max_position_embeddings). min_new_tokens: forbid eos for the first tokens of
    each turn (benchmarks). generator: one torch.Generator, or P*G of them, one per episode (task-major), so
    that an episode's samples do not depend on which other episodes share the batch."""
    # 1. check the arguments
    P, G, cfg = len(seeds), group_size, model.config
    if isinstance(generator, list) and len(generator) != P * G:
        raise ValueError(f"a list of generators needs one per episode ({P * G}), got {len(generator)}")
    if P == 0 or G < 1 or max_turns < 1 or max_new_tokens < 1:
        raise ValueError("need len(seeds) >= 1, group_size >= 1, max_turns >= 1, max_new_tokens >= 1")
    if system_prompts is not None and len(system_prompts) != P:
        raise ValueError(f"system_prompts must have one entry per seed ({P}), got {len(system_prompts)}")
    max_len = cfg.max_position_embeddings if max_len is None else min(max_len, cfg.max_position_embeddings)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    after_eos, user_pre, user_post = template_pieces(tokenizer)

    # 2. one env per episode; one rendered prompt per task (a group's envs must agree on the first observation)
    envs = [make_env() for _ in range(P * G)]
    obs0 = [env.reset(seeds[e // G]) for e, env in enumerate(envs)]
    if any(obs0[e] != obs0[e - e % G] for e in range(P * G)):
        raise RuntimeError("env.reset(seed) gave different observations for the same seed: groups need it")
    systems = system_prompts or [envs[p * G].task_prompt() for p in range(P)]
    prompts = [prompt_ids(tokenizer, systems[p], obs0[p * G]) for p in range(P)]
    eps = [Episode(list(prompts[e // G]), [0] * len(prompts[e // G]), [0.0] * len(prompts[e // G]),
                   len(prompts[e // G]), observations=[obs0[e]], task_id=seeds[e // G], group=e // G)
           for e in range(P * G)]
    W0 = max(map(len, prompts))
    if W0 >= max_len:
        raise ValueError(f"prompt of {W0} tokens leaves no room to sample under max_len={max_len}")

    # 3. prefill each distinct prompt once, then fork its cache row G times (row p -> rows p*G .. p*G+G-1)
    dev = model.head_weight.device
    cache = KVCache(cfg, P, round_up(W0 + max_new_tokens), dev, _cache_dtype(model))  # grows when observations come
    logits = _forward_last(model, cache, *_left_pad(prompts, pad_id, dev)).repeat_interleave(G, 0)  # (P*G, V)
    cache.select([p for p in range(P) for _ in range(G)])
    rows = list(range(P * G))  # rows[r] = episode held by cache row r

    for turn in range(max_turns):
        # 4. sample one model turn for every episode still playing
        gens = [generator[e] for e in rows] if isinstance(generator, list) else generator
        ids, logps, unwritten, cut = _sample_turn(model, cache, logits, max_new_tokens, eos_id, pad_id, temperature,
                                                  top_p, gens, min_new_tokens, max_len)
        keep, blocks = [], []
        for r, e in enumerate(rows):
            # 5. record the turn; unless it was cut mid-turn, send its text to the env
            ep, eos = eps[e], ids[r][-1] == eos_id
            ep.turn_spans.append((len(ep.tokens), len(ep.tokens) + len(ids[r])))
            ep.tokens += ids[r]
            ep.mask += [1] * len(ids[r])
            ep.logprobs += logps[r]
            if cut[r]:
                ep.truncated = True
                continue
            text = tokenizer.decode(ids[r][:-1] if eos else ids[r])
            obs, reward, done, info = envs[e].step(text)
            ep.responses.append(text)
            ep.observations.append(obs)
            ep.reward += float(reward)
            ep.success, ep.completion = bool(info.get("success", False)), float(info.get("completion", 0.0))
            if done or turn == max_turns - 1:
                continue
            # 6. the observation, wrapped as the chat template renders it; a turn cut by the budget gets its eos
            # (mask 0: not sampled) so the context reads as the template's
            tail = ([] if eos else [eos_id]) + _encode(tokenizer, after_eos + user_pre + obs + user_post)
            if len(ep.tokens) + len(tail) >= max_len:  # no room for the observation and one more token
                ep.truncated = True
                continue
            ep.tokens += tail
            ep.mask += [0] * len(tail)
            ep.logprobs += [0.0] * len(tail)
            keep.append(r)
            # the sampler stopped before writing the last step's tokens: this row's block writes its own first
            blocks.append(ids[r][-1:] * unwritten[r] + tail)
        if not keep:
            break
        # 7. finished and truncated episodes leave the batch (no more compute); the others get their observation
        if len(keep) < len(rows):
            cache.select(keep)
        rows = [rows[r] for r in keep]
        logits = _forward_last(model, cache, *_left_pad(blocks, pad_id, dev))

    # 8. keep each env's history; envs holding outside resources (AppWorld) release them, even when truncated
    for ep, env in zip(eps, envs):
        ep.history = list(getattr(env, "history", []))
        if hasattr(env, "close"):
            env.close()
    return eps


@torch.no_grad()
@_packing
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, generator=None,
             min_new_tokens=0):
    """Batched single-turn generation from already rendered prompts; returns the decoded continuations
    (up to, not including, eos)."""
    ids = [_encode(tokenizer, p) for p in prompts]
    if not ids or any(len(s) == 0 for s in ids) or max_new_tokens < 1:
        raise ValueError("generate needs a non-empty list of non-empty prompts and max_new_tokens >= 1")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    dev, W0 = model.head_weight.device, max(map(len, ids))
    cache = KVCache(model.config, len(ids), round_up(W0 + max_new_tokens), dev, _cache_dtype(model))
    logits = _forward_last(model, cache, *_left_pad(ids, pad_id, dev))
    out = _sample_turn(model, cache, logits, max_new_tokens, eos_id, pad_id, temperature, top_p, generator,
                       min_new_tokens, model.config.max_position_embeddings)[0]
    return [tokenizer.decode(s[:-1] if s[-1] == eos_id else s, skip_special_tokens=True) for s in out]


def reprompt(episode, tokenizer, system_prompt):
    """The same episode behind a different prompt ([system_prompt, first observation]): every id after the
    prompt is kept byte for byte, mask / logprobs / spans shift with it. Teacher inputs and off-policy runs.
    The sampled tokens, their count and their order are the student's: the trainer relies on this to split a
    batch of teacher log-probs into rows by the student's per-row sampled-token counts."""
    prompt = prompt_ids(tokenizer, system_prompt, episode.observations[0])
    shift, k = len(prompt) - episode.prompt_len, episode.prompt_len
    return replace(episode, tokens=prompt + episode.tokens[k:], mask=[0] * len(prompt) + episode.mask[k:],
                   logprobs=[0.0] * len(prompt) + episode.logprobs[k:], prompt_len=len(prompt),
                   turn_spans=[(s + shift, e + shift) for s, e in episode.turn_spans])


def batch_tensors(episodes, pad_id, device="cpu"):
    """Right-padded (B, T-1) tensors on the shifted grid: idx = tokens[:-1], tgt = tokens[1:], mask (float, 1
    where tgt was sampled), logp_old (sampler log-prob of tgt), valid (bool, real positions)."""
    if not episodes:
        raise ValueError("batch_tensors needs at least one episode")
    pad = lambda rows, v, dtype: pad_sequence([torch.tensor(r, dtype=dtype) for r in rows], batch_first=True,  # noqa: E731
                                              padding_value=v).to(device)
    return {"idx": pad([ep.tokens[:-1] for ep in episodes], pad_id, torch.long),
            "tgt": pad([ep.tokens[1:] for ep in episodes], pad_id, torch.long),
            "mask": pad([ep.mask[1:] for ep in episodes], 0.0, torch.float),
            "logp_old": pad([ep.logprobs[1:] for ep in episodes], 0.0, torch.float),
            "valid": pad([[True] * (len(ep.tokens) - 1) for ep in episodes], False, torch.bool)}


# ----------------------------------------------------------------------------- scoring: a shared prefix runs once

class PrefixCache:
    """The cache protocol for `sampled_hidden`'s two passes. Pass 1 (group is None): the shared prefixes,
    right-padded, run causally from position 0; each layer's keys/values are kept with their autograd graph.
    Pass 2: row b's continuation starts at position start[b] and attends to the real columns of its group's
    prefix, then causally within its own block (a row with start 0 shares nothing and sees no prefix)."""

    def __init__(self):
        self.k, self.v, self.group, self.start = {}, {}, None, None

    def prepare(self, valid):
        B, W = valid.shape
        steps = torch.arange(W, device=valid.device)
        causal = (steps[None, :] <= steps[:, None]).expand(B, 1, W, W)  # right padding needs no key mask
        if self.group is None:
            self.prefix_valid = valid  # (P, Lp)
            return steps.expand(B, W), causal
        seen = self.prefix_valid[self.group] & (self.start > 0)[:, None]  # (B, Lp) prefix columns of each row
        return self.start[:, None] + steps, torch.cat([seen[:, None, None].expand(B, 1, W, -1), causal], -1)

    def update(self, i, k, v):
        if self.group is None:
            self.k[i], self.v[i] = k, v  # (P, H, Lp, D)
            return k, v
        # (B, H, Lp + W, D): a one-hot matmul hands each row its group's prefix (exact: x * 1 + 0), and its
        # backward sums the rows' gradients in a fixed order; indexing (k[group]) would accumulate them with
        # index_put_, whose order on CPU varies from run to run (non-deterministic gradients)
        onehot = torch.nn.functional.one_hot(self.group, self.k[i].shape[0]).to(k.dtype)  # (B, P)
        return (torch.cat([torch.einsum("bp,phld->bhld", onehot, self.k[i]), k], 2),
                torch.cat([torch.einsum("bp,phld->bhld", onehot, self.v[i]), v], 2))


def sampled_hidden(model, episodes, pad_id, device, shared_prefix=True):
    """Final hidden states at the sampled positions of `episodes` and their batch_tensors dict b: (hs (n, C), b),
    hs in the order of model(b["idx"], return_hidden=True)[b["mask"] > 0]. shared_prefix: episodes identical up
    to their first sampled token (a group's prompt) run that prompt once, which also yields the hidden state
    predicting the first sampled token, and share its keys/values; only the rest runs per episode. Same values
    as the plain path up to float rounding, gradients included; False runs the plain full forward."""
    b = batch_tensors(episodes, pad_id, device)
    sel = b["mask"] > 0  # (B, T)
    keys = [tuple(ep.tokens[:ep.mask.index(1)]) if 1 in ep.mask else () for ep in episodes]
    shared = list(dict.fromkeys(k for k in keys if k and keys.count(k) > 1))  # distinct, in order of first use
    if not shared_prefix or not shared:
        with autocast(device):
            return model(b["idx"], return_hidden=True)[sel], b
    group_of = {k: g for g, k in enumerate(shared)}
    group = torch.tensor([group_of.get(k, 0) for k in keys], device=device)  # (B,) unshared rows: any, unseen
    start = torch.tensor([len(k) if k in group_of else 0 for k in keys], device=device)  # (B,) prefix length
    first = [keys.index(k) for k in shared]  # (P,) a row that holds each prefix
    Lp, T = max(map(len, shared)), b["idx"].shape[1]
    n = b["valid"].sum(1)  # (B,) real positions per row
    cols = start[:, None] + torch.arange(int((n - start).max()), device=device)  # (B, W) plain-grid columns
    valid = cols < n[:, None]
    cols = cols.clamp(max=T - 1)  # padding reads an in-range column; it is never seen
    cache = PrefixCache()
    with autocast(device):
        # pass 1: a holder row's later tokens fill the prefix batch to Lp; masked as padding, nobody sees them
        hp = model(b["idx"][first, :Lp], cache=cache, valid=torch.arange(Lp, device=device) < start[first, None],
                   return_hidden=True)  # (P, Lp, C)
        cache.group, cache.start = group, start
        h = model(b["idx"].gather(1, cols), cache=cache, valid=valid, return_hidden=True)  # (B, W, C)
    # a shared row's first sampled token is predicted by its prompt's last position, computed in pass 1; reading
    # pass 1's output also gives each of its blocks an output gradient, which FSDP2 needs to regather weights
    h = torch.cat([hp[range(len(first)), start[first] - 1][group][:, None], h], 1)  # (B, 1 + W, C)
    return h[torch.cat([start[:, None] > 0, sel.gather(1, cols) & valid], 1)], b
