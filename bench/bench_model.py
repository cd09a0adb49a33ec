"""Forward+backward throughput of our model.py vs transformers' LlamaForCausalLM on SmolLM2-135M (same weights).

Run: python bench/bench_model.py [--batch 4] [--seq 256] [--iters 3]
Prints tokens/s of both, their ratio, and each as a fraction of this CPU's fp32 matmul peak, measured here with a
2048^3 matmul loop. Model FLOPs per token = 6 * N with N = all parameters (134.5M, counting the tied embedding
once: it is the LM head matmul); attention's T^2 FLOPs are not counted, so 100% is out of reach.
Both sides run in one process, interleaved, best-of-iters, so a noisy shared CPU hurts both alike.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import model as M  # noqa: E402


def matmul_peak(n=2048, iters=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best  # FLOP/s


def step_time(fn, idx, tgt):
    t = time.perf_counter()
    logits = fn(idx)  # (B, T, V) fp32
    F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4, help="rows (default 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per side, after one warm-up (default 3)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    ours, _ = M.load("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(M.smollm2_folder(), dtype=torch.float32)
    ref.config.use_cache = False
    n_params = sum(p.numel() for p in ours.parameters())  # tied embedding counted once
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1), generator=g)
    idx, tgt = idx[:, :-1], idx[:, 1:]
    sides = {"ours": ours, "transformers": lambda x: ref(x).logits}
    times = {k: [] for k in sides}
    peak = matmul_peak()
    for it in range(args.iters + 1):  # interleave the two sides so that load spikes hit both
        for name, fn in sides.items():
            for m in (ours, ref):
                m.zero_grad(set_to_none=True)
            dt = step_time(fn, idx, tgt)
            if it > 0:
                times[name].append(dt)
    peak = max(peak, matmul_peak())  # measured before and after: take the better
    tokens = args.batch * args.seq
    print(f"threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3), "
          f"N = {n_params / 1e6:.1f}M params, {args.batch} x {args.seq} tokens, best of {args.iters}")
    tps = {}
    for name, ts in times.items():
        tps[name] = tokens / min(ts)
        frac = 6 * n_params * tps[name] / peak
        print(f"{name:>13}: {tps[name]:7.1f} tokens/s fwd+bwd ({min(ts):.2f} s/step, all {[round(t, 2) for t in ts]}), "
              f"{100 * frac:.1f}% of matmul peak")
    print(f"ratio ours / transformers: {tps['ours'] / tps['transformers']:.3f}x")


if __name__ == "__main__":
    main()
