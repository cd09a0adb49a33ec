"""One skill-sd training step, plain forward vs shared-prefix forward (rollout.sampled_hidden), in one process.

The step is train.py's: the teacher scores the student's tokens with no grad behind a longer skill prompt, then
the student runs forward + backward through losses.token_logprobs with GRPO + lam * SDL, over micro-batches.
Episodes are synthetic (random ids) with the default run's shapes: P = 2 groups, ~70 sampled tokens in 3 turns
(24 + 23 + 23) with two 94-token observations between them, after a prompt all G episodes of a group share:
G = 4 with a 247-token prompt (505-token episodes), then G = 8 with a 2,000-token prompt.

Printed per setting and path: positions computed (forward columns, padding included; student + teacher), wall
and process CPU time (best of --repeats; CPU time is the steadier one on a shared machine), peak memory, and
shared / plain ratios, plus the largest |logp_shared - logp_plain| as a sanity check. Peak memory: on CUDA the
max allocated during the step above what was allocated before; on CPU the largest bytes any micro-batch saved
for backward (unique storages, parameters excluded), which is what grows with the tokens computed.

    python bench/bench_train.py                          # SmolLM2-135M, CPU fp32 (several minutes per setting)
    python bench/bench_train.py --model tiny             # smoke run: seconds, numbers mean nothing
    python bench/bench_train.py --model qwen3-0.6b-shape --device cuda   # random Qwen3-0.6B shape, bf16 autocast
"""
import argparse
import os
import re
import resource
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

TURNS, SAMPLED, OBS = 3, 70, 94


def qwen3_06b_shape(device):
    """Random-init decoder with Qwen3-0.6B's shape (no download); fp32 master weights as train.py keeps them."""
    cfg = M.Config(vocab_size=151_936, hidden_size=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                   intermediate_size=3072, rope_theta=1e6, tie_word_embeddings=True, qk_norm=True,
                   max_position_embeddings=40_960, arch="qwen3")
    with torch.device("meta"):
        model = M.Transformer(cfg)
    model.to_empty(device="cpu")
    M.init_weights(model, 0)  # its generator lives on the CPU
    return model.to(device)


def synth_episodes(P, G, prompt_len, skill_len, vocab, seed=0):
    """P groups x G episodes (student) and the same episodes behind a (prompt_len + skill_len)-token teacher
    prompt per group, shaped as reprompt() makes them."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    student, teacher = [], []
    for p in range(P):
        prompt, t_prompt = rnd(prompt_len), rnd(prompt_len + skill_len)
        for _ in range(G):
            ep = R.Episode(list(prompt), [0] * prompt_len, [0.0] * prompt_len, prompt_len, group=p)
            for t in range(TURNS):
                n = SAMPLED // TURNS + (t < SAMPLED % TURNS)
                ep.turn_spans.append((len(ep.tokens), len(ep.tokens) + n))
                ep.tokens, ep.mask, ep.logprobs = ep.tokens + rnd(n), ep.mask + [1] * n, ep.logprobs + [-2.0] * n
                if t + 1 < TURNS:
                    ep.tokens, ep.mask, ep.logprobs = ep.tokens + rnd(OBS), ep.mask + [0] * OBS, ep.logprobs + [0.0] * OBS
            student.append(ep)
            k, shift = ep.prompt_len, len(t_prompt) - ep.prompt_len
            teacher.append(replace(ep, tokens=t_prompt + ep.tokens[k:], mask=[0] * len(t_prompt) + ep.mask[k:],
                                   logprobs=[0.0] * len(t_prompt) + ep.logprobs[k:], prompt_len=len(t_prompt),
                                   turn_spans=[(s + shift, e + shift) for s, e in ep.turn_spans]))
    return student, teacher


def train_step(model, eps, t_eps, adv, micro_batch, shared, device, inv_t=1 / 0.7, lam=1e-3, chunk=1024):
    """train.py's step minus the optimizer: returns the student's log-probs (n,) and the peak saved bytes of
    any micro-batch (CPU accounting, see the module docstring)."""
    model.zero_grad(set_to_none=True)
    W, num = model.head_weight, sum(sum(e.mask) for e in eps)
    lt_rows, out, peak = {}, [], 0
    batches = [list(range(j, min(j + micro_batch, len(eps)))) for j in range(0, len(eps), micro_batch)]
    with torch.no_grad():
        for rows in batches:
            hs, b = R.sampled_hidden(model, [t_eps[i] for i in rows], 0, device, shared)
            lt = losses.token_logprobs(hs.float() * inv_t, W.float(), b["tgt"][b["mask"] > 0], chunk)
            lt_rows.update(zip(rows, lt.split([sum(eps[i].mask) for i in rows])))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for rows in batches:
        saved = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hs, b = R.sampled_hidden(model, [eps[i] for i in rows], 0, device, shared)
            sel = b["mask"] > 0
            lp = losses.token_logprobs(hs.float() * inv_t, W.float(), b["tgt"][sel], chunk)
            logp, lt = torch.zeros(sel.shape, device=device), torch.zeros(sel.shape, device=device)
            logp[sel], lt[sel] = lp, torch.cat([lt_rows[i] for i in rows])
            loss = (losses.grpo_loss(logp, b["logp_old"], adv[rows], b["mask"], num_tokens=num)[0]
                    + lam * losses.sdl_loss(logp, b["logp_old"], lt, b["mask"], num_tokens=num)[0])
        peak = max(peak, sum(saved.values()))
        loss.backward()
        out.append(lp.detach())
    return torch.cat(out), peak


def measure(model, eps, t_eps, adv, micro_batch, shared, device):
    """One step: positions computed, wall s, CPU s, peak bytes, log-probs."""
    positions = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: positions.append(
        (args[0] if args else kw["idx"]).numel()), with_kwargs=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ru, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        lp, peak = train_step(model, eps, t_eps, adv, micro_batch, shared, device)
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
    finally:
        hook.remove()
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return dict(positions=sum(positions), wall=wall, cpu=ru1.ru_utime + ru1.ru_stime - ru.ru_utime - ru.ru_stime,
                peak=peak, lp=lp)


def compare(model, device, G, prompt_len, skill_len=300, P=2, micro_batch=4, repeats=1, warmup=True,
            shared_micro_batch=None):
    """Plain vs shared-prefix step on one setting; prints the table, returns {path: result}, ratios. The shared
    path may use larger micro-batches (whole groups: the prompt is shared within a micro-batch) than the plain
    path can hold in memory; the loss and gradients do not depend on the micro-batching."""
    mbs = {False: micro_batch, True: shared_micro_batch or micro_batch}
    vocab = model.config.vocab_size
    eps, t_eps = synth_episodes(P, G, prompt_len, skill_len, vocab)
    adv = torch.randn(len(eps), generator=torch.Generator().manual_seed(0)).to(device)
    if warmup:  # first calls pay for allocator growth / kernel selection
        small = [eps[0], eps[1]]
        for shared in (False, True):
            train_step(model, small, t_eps[:2], adv, 2, shared, device)
    best = {}
    for _ in range(repeats):
        for shared in (False, True):  # alternate, so that load drift hits both sides alike
            r = measure(model, eps, t_eps, adv, mbs[shared], shared, device)
            k = "shared" if shared else "plain"
            best[k] = r if k not in best or r["wall"] < best[k]["wall"] else best[k]
    print(f"P={P} x G={G}, prompt {prompt_len} (teacher +{skill_len} skill), {len(eps[0].tokens)} tokens per "
          f"episode, micro-batch {mbs[False]} plain / {mbs[True]} shared, {device}, best of {repeats}")
    for k, r in best.items():
        print(f"  {k:6s}: {r['positions']:7d} positions  {r['wall']:8.2f} s wall  {r['cpu']:8.2f} s cpu  "
              f"peak {r['peak'] / 2**20:9.1f} MiB")
    p, s = best["plain"], best["shared"]
    ratios = {k: s[k] / p[k] for k in ("positions", "wall", "cpu", "peak")}
    dlp = (s["lp"] - p["lp"]).abs().max().item()
    print("  shared / plain: " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + f"  | max |logp shared - plain| {dlp:.1e}", flush=True)
    return best, ratios, dlp


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), tiny (smoke test), qwen3-0.6b-shape (random init), or any model.load name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per path and setting, best kept (default 1)")
    p.add_argument("--micro-batch", type=int, default=4, help="episodes per forward/backward (train.py's default 4)")
    p.add_argument("--skill-tokens", type=int, default=300, help="extra teacher-prompt tokens (the skill), default 300")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--shared-micro-batch", type=int, default=None,
                   help="micro-batch of the shared-prefix path (default: --micro-batch); e.g. G, so each group's "
                        "prompt runs once, where the plain path needs smaller micro-batches to fit in memory")
    p.add_argument("--settings", nargs="+", default=None, metavar="GxPROMPT",
                   help="group size x shared-prompt tokens per setting (default 4x247 8x2000; tiny: 4x247 8x600)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = qwen3_06b_shape(device) if args.model == "qwen3-0.6b-shape" else M.load(args.model, device=device)[0]
    model.train()
    pairs = args.settings or (["4x247", "8x2000"] if args.model != "tiny" else ["4x247", "8x600"])
    if not all(re.fullmatch(r"[1-9]\d*x[1-9]\d*", g) for g in pairs):
        p.error(f"--settings takes GxPROMPT pairs of positive integers like 8x2000, got {args.settings}")
    settings = [tuple(int(x) for x in g.split("x")) for g in pairs]
    for G, prompt_len in settings:
        compare(model, device, G, prompt_len, args.skill_tokens, micro_batch=args.micro_batch, repeats=args.repeats,
                shared_micro_batch=args.shared_micro_batch)


if __name__ == "__main__":
    main()
