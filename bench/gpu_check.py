"""GPU check (run by hand on a CUDA machine; the project never needs one): CUDA parity, bf16, fused-loss memory.

    python bench/gpu_check.py            # prints one line per check; exits non-zero if a check fails
    python bench/gpu_check.py --new      # only checks 5 and 6 (about 2 minutes)

1. Our decoder vs transformers' Qwen3 (random tiny config) on CUDA in fp32, and our fp32 vs bf16-autocast logits.
2. Fused token_logprobs vs naive on CUDA: values, gradients, peak memory and time (V = 151,936, N = 8,192, C = 1,024).
3. The sampler on CUDA under bf16 autocast: sampler log-probs vs the trainer's recomputation.
4. train.py end to end on CUDA with a ~0.2B random model (byte tokenizer): steps complete, tokens/s.
5. Shared-prefix vs plain training step (bench/bench_train.py) in bf16 on a random model of Qwen3-0.6B's shape:
   log-probs and gradients agree, times and ratios for G = 4 x 247-token and G = 8 x 2,000-token prompts.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

dev = torch.device("cuda")
ok = True


def check(name, cond, detail):
    global ok
    ok &= bool(cond)
    print(f"[{'PASS' if cond else 'FAIL'}] {name}: {detail}", flush=True)


def kernel_sweep(device, N=8192, Cs=(1024, 2560), V=151_936, chunks=(512, 1024, 2048, 4096), reps=3):
    """Fused token_logprobs fwd+bwd, exact fp32 and with TF32 gradient matmuls (tf32_grads=True), per chunk size,
    against the naive path (materialised (N, V) logits) in fp32; naive TF32 and bf16-autocast rows for context.
    One table: median time, peak memory above the inputs, errors against naive fp32. Checks: every fused row
    agrees with naive fp32 (fp32 rel 1e-3, TF32 rel 1e-2), and on CUDA some fused row is <= 1.10x the naive fp32
    time at <= 0.15x its peak. About 30 s on an H100/H200; `python bench/gpu_check.py --kernel-sweep` runs only
    this, `--cpu-smoke` dry-runs it on CPU at tiny sizes (times and memory meaningless there)."""
    cuda, gib = device.type == "cuda", 2 ** 30
    print(f"kernel sweep: {torch.cuda.get_device_name() if cuda else 'CPU smoke'}, torch {torch.__version__}, "
          f"N={N} V={V}, fwd+bwd, median of {reps} after a warm-up; ratios are to naive fp32", flush=True)
    print(f"{'C':>5} {'path':<22} {'ms':>8} {'x time':>7} {'GiB':>6} {'x peak':>7} {'|dlogp|':>8} {'rel dgh':>8} "
          f"{'rel dgW':>8}", flush=True)
    for C in Cs:
        g = torch.Generator(device=device).manual_seed(0)
        h = (torch.randn(N, C, device=device, generator=g) * 0.5).requires_grad_()   # (N, C)
        W = (torch.randn(V, C, device=device, generator=g) * 0.02).requires_grad_()  # (V, C)
        t = torch.randint(0, V, (N,), device=device, generator=g)
        go = torch.randn(N, device=device, generator=g)                              # upstream d loss / d logp

        def naive(tf32=False, bf16=False):
            with losses._tf32(tf32):  # the flag is global: backward inside the block too
                with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    z = h @ W.T                                                      # (N, V)
                lp = torch.log_softmax(z.float(), -1).gather(1, t[:, None])[:, 0]
                return (lp.detach(), *torch.autograd.grad(lp, (h, W), go))

        def fused(cs, tf32):
            lp = losses.token_logprobs(h, W, t, cs, tf32_grads=tf32)
            return (lp.detach(), *torch.autograd.grad(lp, (h, W), go))

        rows = [("naive fp32", naive), ("naive tf32", lambda: naive(tf32=True)),
                ("naive bf16 autocast", lambda: naive(bf16=True))]
        rows += [(f"fused {'tf32' if tf else 'fp32'} chunk {cs}", lambda cs=cs, tf=tf: fused(cs, tf))
                 for tf in (False, True) for cs in chunks]
        ref, best = None, {}
        for name, fn in rows:
            try:
                times = []
                for _ in range(reps + 1):  # the first run warms up cuBLAS and the allocator
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() if cuda else 0
                    t0 = time.perf_counter()
                    out = fn()
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                    peak = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
                ms = sorted(times[1:])[len(times[1:]) // 2] * 1e3
            except Exception as e:  # one broken row must not hide the others
                check(f"sweep C={C} {name}", False, f"{type(e).__name__}: {str(e)[:300]}")
                if ref is None:  # no naive fp32 reference: nothing to compare with at this C
                    break
                continue
            ref = ref or (ms, peak, out)
            err = [(out[0] - ref[2][0]).abs().max().item()] + [
                ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out[1:], ref[2][1:])]
            print(f"{C:>5} {name:<22} {ms:>8.1f} {ms / ref[0]:>6.2f}x {peak / gib:>6.2f} {peak / ref[1]:>7.3f} "
                  f"{err[0]:>8.1e} {err[1]:>8.1e} {err[2]:>8.1e}", flush=True)
            if name.startswith("fused"):
                tol = 1e-2 if "tf32" in name else 1e-3
                if not (err[0] < 1e-3 and max(err[1:]) < tol):
                    check(f"sweep C={C} {name} agrees with naive fp32", False, f"errors {err}")
                variant = name.split(" chunk")[0]
                if peak <= 0.15 * ref[1] and ms < best.get(variant, (float("inf"),))[0]:
                    best[variant] = (ms, name, peak)
        for variant, (ms, name, peak) in best.items():
            print(f"{C:>5} fastest {variant} within 0.15x peak: {name}, {ms / ref[0]:.2f}x time, "
                  f"{peak / ref[1]:.3f}x peak", flush=True)
        if cuda:
            check(f"sweep C={C}: a fused row <= 1.10x naive fp32 time at <= 0.15x peak",
                  any(ms <= 1.10 * ref[0] for ms, _, _ in best.values()),
                  ", ".join(f"{v}: {ms / ref[0]:.2f}x" for v, (ms, _, _) in best.items()) or "no row within 0.15x peak")


def check_shared_prefix():
    """5. rollout.sampled_hidden's shared-prefix step vs the plain step, bf16 autocast, Qwen3-0.6B shape."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_train as BT
    big = BT.qwen3_06b_shape(dev).train()
    eps, t_eps = BT.synth_episodes(2, 4, 247, 300, big.config.vocab_size)
    adv = torch.randn(len(eps), generator=torch.Generator().manual_seed(0)).to(dev)
    grads = []
    for shared in (False, True):
        BT.train_step(big, eps, t_eps, adv, 4, shared, dev)
        grads.append(torch.cat([q.grad.float().flatten() for q in big.parameters()]))
    rel = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    check("shared-prefix gradients, CUDA bf16", rel < 0.05, f"|g_shared - g_plain| / |g_plain| = {rel:.1e}")
    del grads
    for G, prompt_len in ((4, 247), (8, 2000)):
        best, ratios, dlp = BT.compare(big, dev, G, prompt_len, repeats=3)
        d = (best["shared"]["lp"] - best["plain"]["lp"]).abs()
        # a third of the tokens must show in memory; time is reported only: at 0.6B the step is host-bound
        # (an H200 gave 0.98x wall at G=8 for 0.63x GPU time, 1.7x wall at G=4)
        leaner = ratios["peak"] < 0.7 if G == 8 else True
        check(f"shared-prefix step, G={G}, prompt {prompt_len}", d.mean() < 0.02 and leaner,
              f"time {best['shared']['wall'] * 1e3:.0f} vs {best['plain']['wall'] * 1e3:.0f} ms ({ratios['wall']:.2f}x), "
              f"peak {ratios['peak']:.2f}x, positions {ratios['positions']:.2f}x, |dlogp| mean {d.mean():.1e} "
              f"max {dlp:.1e}")



if "--new" in sys.argv:  # only the checks added last (5 and 6): a short run for a small device budget
    kernel_sweep(dev)
    check_shared_prefix()
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)
if "--kernel-sweep" in sys.argv or "--cpu-smoke" in sys.argv:  # only the sweep: on CUDA, or a tiny CPU dry run
    if "--cpu-smoke" in sys.argv:
        kernel_sweep(torch.device("cpu"), N=64, Cs=(16, 40), V=1000, chunks=(16, 64), reps=1)
    else:
        kernel_sweep(dev)
    print("ALL PASS" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


# 1. parity with transformers on CUDA, fp32 and bf16 autocast
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
torch.manual_seed(0)
cfg = Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=48, tie_word_embeddings=False, max_position_embeddings=512)
with tempfile.TemporaryDirectory() as d:
    hf = Qwen3ForCausalLM(cfg).eval()
    hf.save_pretrained(d)
    M.load("tiny")[1].save_pretrained(d)  # a folder needs a tokenizer: reuse tiny's
    ours = M.load(d, device=dev)[0].eval()
    hf = hf.to(dev)
    idx = torch.randint(0, 512, (2, 64), device=dev)
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits.float()
        with M.autocast(dev):
            c = ours(idx)
    check("Qwen3 parity, CUDA fp32", (a - b).abs().max() < 1e-3, f"max |ours - transformers| {(a - b).abs().max():.2e}")
    check("bf16 autocast logits", c.dtype == torch.float32 and (a - c).abs().max() < 0.5,
          f"fp32 out, max |fp32 - bf16| {(a - c).abs().max():.2e}")

# 2. fused kernel on CUDA
N, C, V = 8192, 1024, 151_936
h = (torch.randn(N, C, device=dev) * 0.5).requires_grad_()
W = (torch.randn(V, C, device=dev) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,), device=dev)


def run(fused):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.time()
    lp = losses.token_logprobs(h, W, t, 1024) if fused else torch.log_softmax(h @ W.T, -1).gather(1, t[:, None])[:, 0]
    gh, gw = torch.autograd.grad(lp.sum(), (h, W))
    torch.cuda.synchronize()
    return lp.detach(), gh, gw, time.time() - t0, torch.cuda.max_memory_allocated() - base


run(True), run(False)  # warm-up
lf, ghf, gwf, tf, mf = run(True)
ln, ghn, gwn, tn, mn = run(False)
check("fused == naive on CUDA", (lf - ln).abs().max() < 1e-3 and (ghf - ghn).abs().max() < 1e-4,
      f"|logp| {(lf - ln).abs().max():.1e}, |grad h| {(ghf - ghn).abs().max():.1e}, |grad W| {(gwf - gwn).abs().max():.1e}")
check("fused memory / time on CUDA", mf < 0.15 * mn, f"peak {mf / 2**30:.2f} vs {mn / 2**30:.2f} GiB (ratio {mf / mn:.3f}), "
      f"time {tf * 1e3:.0f} vs {tn * 1e3:.0f} ms ({tf / tn:.2f}x)")
del h, W, ghf, gwf, ghn, gwn

# 3. sampler on CUDA under bf16 autocast
model, tok = M.load("tiny", device=dev)
mk = lambda: envs.make_env("sokoban", max_turns=3)  # noqa: E731
gens = [torch.Generator().manual_seed(i) for i in range(8)]
with torch.no_grad(), M.autocast(dev):
    eps = R.rollout(model, tok, mk, envs.task_set("train", 2), 4, 3, 16, temperature=1.0, generator=gens)
b = R.batch_tensors(eps, tok.pad_token_id, dev)
with torch.no_grad(), M.autocast(dev):
    hid = model(b["idx"], return_hidden=True)
sel = b["mask"] > 0
lp = losses.token_logprobs(hid[sel].float(), model.head_weight.float(), b["tgt"][sel])
d = (lp - b["logp_old"][sel]).abs()
check("sampler vs trainer log-probs, CUDA bf16", d.max() < 0.05, f"{sel.sum().item()} tokens, mean {d.mean():.1e} max {d.max():.1e}")

# 4. train.py on CUDA with a ~0.2B random model
with tempfile.TemporaryDirectory() as d:
    cfg = M.Config(vocab_size=model.config.vocab_size, hidden_size=1024, n_layers=16, n_heads=16, n_kv_heads=4,
                   head_dim=64, intermediate_size=4096, max_position_embeddings=8192)
    big = M.Transformer(cfg)
    M.init_weights(big, 0)
    M.save(big, tok, d)
    out = os.path.join(d, "run")
    t0 = time.time()
    r = subprocess.run([sys.executable, "train.py", "--model", d, "--device", "cuda", "--steps", "4", "--prompts-per-step", "4",
                        "--group-size", "8", "--max-turns", "3", "--max-new-tokens", "32", "--micro-batch", "8",
                        "--eval-n", "8", "--out", out], capture_output=True, text=True)
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))] if r.returncode == 0 else []
    check("train.py on CUDA, 0.2B random model", r.returncode == 0 and len(rows) == 4,
          f"{sum(q.numel() for q in big.parameters()) / 1e6:.0f}M params, {time.time() - t0:.0f} s, "
          + (f"step {rows[-1]['step_time']:.1f} s, rollout {rows[-1]['rollout_time']:.1f} s, "
             f"peak {rows[-1]['peak_mem_gb']:.1f} GB" if rows else r.stderr[-1500:]))



# 5. fused-kernel sweep: chunk sizes x (fp32, TF32 gradient matmuls) vs naive
kernel_sweep(dev)
# 6. the shared-prefix training step vs the plain one
check_shared_prefix()
print("ALL PASS" if ok else "SOME CHECKS FAILED")
sys.exit(0 if ok else 1)
