"""Batched multi-turn sampling with a preallocated KV cache; episodes are token-in, token-out.

The trainer scores exactly the ids sampled here: prompts, model turns and observations are kept as token ids
from the start (an `Episode`), never re-rendered or re-tokenized, so the sampled tokens, their positions and the
sampler's log-probs cannot drift apart from what the loss sees.

Legend: L layers, B cache rows (episodes in flight), H kv heads, D head dim, T cache columns (max_len),
S columns in use after the current block, W columns in the block being written, V vocab, C hidden size,
P distinct prompts, G samples per prompt.

Deliberate simplifications:
- One shared write cursor: each forward writes W columns for every row, padding columns are masked out.
  Padding therefore costs cache columns; when finished episodes are dropped (at turn boundaries), columns that
  are padding for every remaining row are compacted away.
- Rows that ended their turn early keep riding along (as masked padding) until the slowest row of the turn is
  done (a decode step costs nearly the same for 8 rows as for 4: skinny matmuls); rows whose episode ended are
  dropped from the batch at the turn boundary, so they stop costing compute.
- The cache never grows. When the next block does not fit, every episode still running is cut and flagged
  `truncated` (a cut mid-turn keeps its sampled tokens but is not sent to the env).
- Log-probs are recorded under the tempered model, log softmax(logits / temperature) over the full vocabulary
  (the raw model at temperature 0 or 1): the policy that actually drew the tokens, and exactly what the trainer
  recomputes from hidden / temperature, so on-policy importance ratios are 1 and the SDL estimator stays
  unbiased. Top-p and min_new_tokens only change which token is drawn (top-p < 1 makes sampling slightly
  off-policy with respect to the recorded log-probs).
- Observations are wrapped with pieces of the tokenizer's own chat template (see `template_pieces`), found once
  by rendering sentinel conversations. The appended ids equal what the template renders for the whole
  conversation, except at the prompt/response boundary, where re-tokenizing text could merge tokens
  differently (which is why nothing is ever re-tokenized). Templates that rewrite earlier turns (e.g. Qwen3
  thinking) are rejected with a clear error.
- `max_turns` reached without the env being done ends the episode without `truncated`.
"""
from dataclasses import dataclass, field, replace

import torch

from model import autocast


class KVCache:
    """Preallocated keys/values for B rows x T columns, a per-row valid mask and next RoPE position, and one
    shared write cursor. The model calls prepare() once per forward and update() once per layer."""

    def __init__(self, config, batch, max_len, device="cpu", dtype=torch.float32):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)  # (L, B, H, T, D)
        # empty is safe: a column is only ever read after a block (padding included) has written it
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, T) real tokens
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) RoPE position of the next token
        self.max_len, self.cursor, self.block = max_len, 0, (0, 0)

    @property
    def batch(self):
        return self.k.shape[1]

    def prepare(self, valid):
        """Reserve W columns; return RoPE positions (B, W) and the attention mask (B, 1, W, S), True = attend."""
        if valid.ndim != 2 or valid.shape[0] != self.batch:
            raise ValueError(f"valid must be (B={self.batch}, W) bool, got {tuple(valid.shape)}")
        W = valid.shape[1]
        start, end = self.cursor, self.cursor + W
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} columns needed, {self.max_len} allocated")
        self.valid[:, start:end] = valid
        pos = (self.next_pos[:, None] + valid.cumsum(1) - 1).clamp_(min=0)  # (B, W) contiguous per row
        self.next_pos += valid.sum(1)
        cols = torch.arange(end, device=valid.device)
        rows = cols[start:, None]  # (W, 1) column index of each query
        mask = (cols <= rows) & self.valid[:, None, :end]  # (B, W, S) causal, padding keys hidden
        mask |= cols == rows  # a query may always see itself: no fully masked row, no NaN
        self.cursor, self.block = end, (start, end)
        return pos, mask[:, None]

    def update(self, i, k, v):
        """Store layer i's block (B, H, W, D); return its keys / values over all S columns (B, H, S, D)."""
        start, end = self.block
        self.k[i, :, :, start:end] = k
        self.v[i, :, :, start:end] = v
        return self.k[i, :, :, :end], self.v[i, :, :, :end]

    def repeat(self, G):
        """Repeat every row G times in place (row p -> rows p*G .. p*G+G-1): prefill P prompts once, sample P*G."""
        if G == 1:
            return
        S, (L, B, H, T, D) = self.cursor, self.k.shape
        for name in ("k", "v"):
            new = torch.empty(L, B * G, H, T, D, device=self.k.device, dtype=self.k.dtype)
            new.view(L, B, G, H, T, D)[..., :S, :] = getattr(self, name)[:, :, None, :, :S]
            setattr(self, name, new)
        self.valid = self.valid.repeat_interleave(G, 0)
        self.next_pos = self.next_pos.repeat_interleave(G, 0)

    def select(self, rows):
        """Keep only `rows` (in that order), dropping the others; columns now padding for all rows are removed."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        valid = self.valid[rows, :self.cursor]  # (B', S)
        cols = valid.any(0).nonzero().squeeze(1)  # columns some remaining row still attends to
        n, (L, _, H, T, D) = len(cols), self.k.shape
        for name in ("k", "v"):
            new = torch.empty(L, len(rows), H, T, D, device=self.k.device, dtype=self.k.dtype)
            new[:, :, :, :n] = getattr(self, name)[:, :, :, :self.cursor].index_select(1, rows).index_select(3, cols)
            setattr(self, name, new)
        self.valid = torch.zeros(len(rows), T, dtype=torch.bool, device=valid.device)
        self.valid[:, :n] = valid[:, cols]
        self.next_pos, self.cursor = self.next_pos[rows], n


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
    u = u[:, None]
    cdf = probs.cumsum(-1)  # (B, V)
    tok = torch.searchsorted(cdf, u.to(probs.device) * cdf[:, -1:]).clamp_(max=probs.shape[1] - 1).squeeze(1)
    return tok if order is None else order.gather(-1, tok[:, None]).squeeze(1)


def _forward_last(model, cache, idx, valid):
    """Write a (B, W) block into the cache; return fp32 logits (B, V) of each row's last column. The head runs
    on the last column only (an observation block of 100 columns would otherwise cost 100x the head)."""
    with autocast(idx.device):
        h = model(idx, cache=cache, valid=valid, return_hidden=True)[:, -1]  # (B, C)
    with torch.autocast(idx.device.type, enabled=False):  # fp32 head even inside a caller's bf16 autocast:
        return h.float() @ model.head_weight.float().T   # logp_old must match the trainer's fp32 scoring


def _cache_dtype(model):
    # on CUDA the forward runs under bf16 autocast (model.autocast), so k / v arrive in bf16: store them so
    w = model.head_weight
    return torch.bfloat16 if w.device.type == "cuda" and w.dtype == torch.float32 else w.dtype


def _left_pad(seqs, pad_id, device):
    W = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), W), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), W, dtype=torch.bool)
    for b, s in enumerate(seqs):
        idx[b, W - len(s):] = torch.tensor(s, dtype=torch.long)
        valid[b, W - len(s):] = True
    return idx.to(device), valid.to(device)


def _uniforms(gens, active):
    """One uniform in (0, 1] per active row, each from that row's own generator; inactive rows draw nothing. So
    an episode's samples depend only on its own generator, not on which other episodes share the batch."""
    return torch.tensor([1.0 - torch.rand(1, generator=g).item() if a else 1.0 for g, a in zip(gens, active.tolist())])


def _sample_turn(model, cache, logits, max_new, eos_id, pad_id, temperature, top_p, generator, min_new=0):
    """Sample one turn for every row of the cache, starting from `logits` (B, V) of the last written column.
    Each row stops at eos or after max_new tokens; the loop stops when all rows have, or the cache is full.
    The last sampled token of rows still active at the end is NOT in the cache yet (the next block writes it).
    Returns dict of tok (B, N) / logp (B, N) on CPU, n (B,) tokens sampled per row, eos (B,) ended by eos,
    unwritten (B,) last token not in the cache, cut (B,) stopped by the context limit."""
    B, dev = logits.shape[0], logits.device
    tok_buf = torch.full((B, max_new), pad_id, dtype=torch.long, device=dev)  # (B, N)
    logp_buf = torch.zeros(B, max_new, device=dev)  # (B, N)
    active = torch.ones(B, dtype=torch.bool, device=dev)  # still sampling this turn
    n = torch.zeros(B, dtype=torch.long, device=dev)
    hit_eos = torch.zeros(B, dtype=torch.bool, device=dev)
    cut = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(max_new):
        scaled = logits / temperature if temperature > 0 else logits  # the policy trained is the tempered one
        lse = torch.logsumexp(scaled, -1)  # (B,)
        draw = logits
        if t < min_new:  # forced length (benchmarks): forbid eos for the draw only
            draw = logits.clone()
            draw[:, eos_id] = float("-inf")
        u = _uniforms(generator, active).to(dev) if isinstance(generator, list) and temperature > 0 else None
        tok = torch.where(active, sample(draw, temperature, top_p, generator if u is None else None, u), pad_id)
        tok_buf[:, t] = tok
        logp_buf[:, t] = scaled.gather(1, tok[:, None]).squeeze(1) - lse
        n += active
        stop = active & (tok == eos_id)
        hit_eos |= stop
        still = active & ~stop
        if t + 1 == max_new or not still.any():
            break
        if cache.cursor + 1 > cache.max_len:
            cut = still
            break
        logits = _forward_last(model, cache, tok[:, None], active[:, None])  # rows done this turn: padding
        active = still
    return dict(tok=tok_buf.cpu(), logp=logp_buf.cpu(), n=n.tolist(), eos=hit_eos.tolist(),
                unwritten=active.tolist(), cut=cut.tolist())


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages, gen):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def template_pieces(tokenizer):
    """The chat template's text around an observation: (after_eos, user_pre, user_post). A model turn that
    ended with eos is followed by after_eos + user_pre + obs + user_post (e.g. ChatML: "\\n",
    "<|im_start|>user\\n", "<|im_end|>\\n<|im_start|>assistant\\n"). Found by rendering sentinel conversations,
    so it holds for any template that renders earlier turns unchanged when a turn is appended."""
    A, U = "ASSISTANT_SENTINEL_7f3a", "USER_SENTINEL_7f3a"
    base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    head = _render(tokenizer, base, True)
    closed = _render(tokenizer, base + [{"role": "assistant", "content": A}], False)
    nxt = _render(tokenizer, base + [{"role": "assistant", "content": A}, {"role": "user", "content": U}], True)
    eos = tokenizer.eos_token
    ok = closed.startswith(head + A) and nxt.startswith(closed) and nxt.count(U) == 1
    tail = closed[len(head) + len(A):]
    if not ok or not tail.startswith(eos):
        raise ValueError("unsupported chat template: it must end an assistant turn with eos_token "
                         f"({eos!r}) and render earlier turns unchanged when a new turn is appended")
    pre, post = nxt[len(closed):].split(U)
    return tail[len(eos):], pre, post


@torch.no_grad()
def rollout(model, tokenizer, make_env, seeds, group_size, max_turns, max_new_tokens, temperature=1.0,
            top_p=1.0, generator=None, max_len=None, system_prompts=None, min_new_tokens=0):
    """Play P=len(seeds) tasks x G=group_size samples; returns P*G Episodes, task-major. max_len: cache
    columns (padding included; default: a guess from the prompt and first observation, capped by the model's
    max_position_embeddings). min_new_tokens: forbid eos for the first tokens of each turn (benchmarks).
    generator: one torch.Generator for the batch, or a list of P*G generators, one per episode (task-major), so
    that each episode's samples do not depend on which other episodes share the batch."""
    P, G = len(seeds), group_size
    if isinstance(generator, list) and len(generator) != P * G:
        raise ValueError(f"a list of generators needs one per episode ({P * G}), got {len(generator)}")
    if P == 0 or G < 1 or max_turns < 1 or max_new_tokens < 1:
        raise ValueError("need len(seeds) >= 1, group_size >= 1, max_turns >= 1, max_new_tokens >= 1")
    if system_prompts is not None and len(system_prompts) != P:
        raise ValueError(f"system_prompts must have one entry per seed ({P}), got {len(system_prompts)}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    after_eos, user_pre, user_post = template_pieces(tokenizer)
    envs = [make_env() for _ in range(P * G)]
    obs0 = [env.reset(seeds[e // G]) for e, env in enumerate(envs)]
    if any(obs0[e] != obs0[e - e % G] for e in range(P * G)):
        raise RuntimeError("env.reset(seed) gave different observations for the same seed: groups need it")
    systems = system_prompts or [envs[p * G].task_prompt() for p in range(P)]
    prompts = [_encode(tokenizer, _render(tokenizer, [{"role": "system", "content": systems[p]},
                                                      {"role": "user", "content": obs0[p * G]}], True))
               for p in range(P)]
    eps = [Episode(list(prompts[e // G]), [0] * len(prompts[e // G]), [0.0] * len(prompts[e // G]),
                   len(prompts[e // G]), observations=[obs0[e]], task_id=seeds[e // G], group=e // G)
           for e in range(P * G)]

    cfg, W0 = model.config, max(map(len, prompts))
    if max_len is None:
        obs_len = len(_encode(tokenizer, after_eos + user_pre + obs0[0] + user_post))
        max_len = W0 + max_turns * (max_new_tokens + 2 + 2 * obs_len)
    max_len = min(max_len, cfg.max_position_embeddings)
    if W0 >= max_len:
        raise ValueError(f"prompt of {W0} tokens does not fit max_len={max_len}")
    dev = model.head_weight.device
    cache = KVCache(cfg, P, max_len, dev, _cache_dtype(model))
    logits = _forward_last(model, cache, *_left_pad(prompts, pad_id, dev)).repeat_interleave(G, 0)  # (P*G, V)
    cache.repeat(G)
    rows = list(range(P * G))  # rows[r] = episode held by cache row r

    for turn in range(max_turns):
        gens = [generator[e] for e in rows] if isinstance(generator, list) else generator
        out = _sample_turn(model, cache, logits, max_new_tokens, eos_id, pad_id, temperature, top_p,
                           gens, min_new_tokens)
        keep, blocks, obs_ids = [], [], []
        for r, e in enumerate(rows):
            ep, n = eps[e], out["n"][r]
            ids = out["tok"][r, :n].tolist()
            start = len(ep.tokens)
            ep.tokens += ids
            ep.mask += [1] * n
            ep.logprobs += out["logp"][r, :n].tolist()
            ep.turn_spans.append((start, start + n))
            if out["cut"][r]:
                ep.truncated = True
                continue
            text = tokenizer.decode(ids[:-1] if out["eos"][r] else ids)
            obs, reward, done, info = envs[e].step(text)
            ep.responses.append(text)
            ep.observations.append(obs)
            ep.reward += float(reward)
            ep.success, ep.completion = bool(info.get("success", False)), float(info.get("completion", 0.0))
            if done or turn == max_turns - 1:
                continue
            # a turn cut by the budget gets its eos (mask 0: not sampled) so the context reads as the template's
            tail = ([] if out["eos"][r] else [eos_id]) + _encode(tokenizer, after_eos + user_pre + obs + user_post)
            keep.append(r)
            obs_ids.append(tail)
            blocks.append(ids[-1:] * out["unwritten"][r] + tail)
        if not keep:
            break
        if len(keep) < len(rows):
            cache.select(keep)  # finished episodes leave the batch: no more compute, their columns compacted
        if cache.cursor + max(map(len, blocks)) >= cache.max_len:  # no room for the observation + one token
            for r in keep:
                eps[rows[r]].truncated = True
            break
        for r, tail in zip(keep, obs_ids):
            ep = eps[rows[r]]
            ep.tokens += tail
            ep.mask += [0] * len(tail)
            ep.logprobs += [0.0] * len(tail)
        rows = [rows[r] for r in keep]
        logits = _forward_last(model, cache, *_left_pad(blocks, pad_id, dev))
    for ep, env in zip(eps, envs):
        ep.history = list(getattr(env, "history", []))
        if hasattr(env, "close"):  # envs holding outside resources (AppWorld) release them, even when truncated
            env.close()
    return eps


@torch.no_grad()
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
    cache = KVCache(model.config, len(ids), W0 + max_new_tokens, dev, _cache_dtype(model))
    logits = _forward_last(model, cache, *_left_pad(ids, pad_id, dev))
    out = _sample_turn(model, cache, logits, max_new_tokens, eos_id, pad_id, temperature, top_p, generator,
                       min_new_tokens)
    return [tokenizer.decode(out["tok"][r, :out["n"][r] - out["eos"][r]].tolist(), skip_special_tokens=True)
            for r in range(len(ids))]


def reprompt(episode, tokenizer, system_prompt):
    """The same episode behind a different prompt ([system_prompt, first observation]): every id after the
    prompt is kept byte for byte, mask / logprobs / spans shift with it. Teacher inputs and off-policy runs."""
    prompt = _encode(tokenizer, _render(tokenizer, [{"role": "system", "content": system_prompt},
                                                    {"role": "user", "content": episode.observations[0]}], True))
    shift, k = len(prompt) - episode.prompt_len, episode.prompt_len
    return replace(episode, tokens=prompt + episode.tokens[k:], mask=[0] * len(prompt) + episode.mask[k:],
                   logprobs=[0.0] * len(prompt) + episode.logprobs[k:], prompt_len=len(prompt),
                   turn_spans=[(s + shift, e + shift) for s, e in episode.turn_spans])


def batch_tensors(episodes, pad_id, device="cpu"):
    """Right-padded (B, T-1) tensors on the shifted grid: idx = tokens[:-1], tgt = tokens[1:], mask (float, 1
    where tgt was sampled), logp_old (sampler log-prob of tgt), valid (bool, real positions)."""
    if not episodes:
        raise ValueError("batch_tensors needs at least one episode")
    B, T = len(episodes), max(len(ep.tokens) for ep in episodes) - 1
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), pad_id, dtype=torch.long)
    mask, logp_old = torch.zeros(B, T), torch.zeros(B, T)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, ep in enumerate(episodes):
        n = len(ep.tokens) - 1
        idx[b, :n] = torch.tensor(ep.tokens[:-1])
        tgt[b, :n] = torch.tensor(ep.tokens[1:])
        mask[b, :n] = torch.tensor(ep.mask[1:], dtype=torch.float)
        logp_old[b, :n] = torch.tensor(ep.logprobs[1:], dtype=torch.float)
        valid[b, :n] = True
    return {k: v.to(device) for k, v in dict(idx=idx, tgt=tgt, mask=mask, logp_old=logp_old, valid=valid).items()}
