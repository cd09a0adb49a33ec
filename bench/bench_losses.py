"""Fused chunked token_logprobs vs the naive path (materialised (N, V) logits + log_softmax + gather), forward +
backward, fp32 on CPU: peak memory and time, printed as fused / naive ratios from one run of each side.

Each side runs once in its own fresh child process, so that peaks cannot hide each other and the allocator
starts clean. Peak memory = ru_maxrss at the end minus the resident set right after the inputs (hidden, weight,
targets, upstream grad) were made; the inputs are filled in place so no transient copy raises the high-water
mark early. Both sides therefore count grad_weight (V, C) and grad_hidden (N, C). Time is wall clock and
process CPU time (user + sys); the CPU time ratio is the steadier one on a shared machine.

    python bench/bench_losses.py                    # V = 49,152 and 151,936, C = 1024, N = 8,192
    python bench/bench_losses.py --n 2048 --vocab 49152 --chunk-size 512
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(side, n, c, v, chunk_size):
    sys.path.insert(0, ROOT)
    import torch
    from losses import token_logprobs

    torch.manual_seed(0)
    hidden = torch.empty(n, c).normal_().requires_grad_()                    # (N, C)
    weight = torch.empty(v, c).normal_(0, 0.02).requires_grad_()             # (V, C)
    targets = torch.randint(0, v, (n,))
    grad_out = torch.empty(n).normal_()                                      # upstream d loss / d logp
    small = (hidden[:8].detach(), weight[:64].detach(), targets[:8] % 64)    # warm up kernels, not timed
    torch.log_softmax(small[0] @ small[1].T, -1)
    token_logprobs(*small, chunk_size=4)

    base = rss_bytes()
    ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if side == "naive":
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)  # (N, V) live
    else:
        logp = token_logprobs(hidden, weight, targets, chunk_size=chunk_size)
    logp.backward(grad_out)
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    peak = ru1.ru_maxrss * 1024 - base                                       # ru_maxrss is in KiB on Linux
    print(json.dumps(dict(side=side, wall=wall, cpu=ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime,
                          peak=peak, logp_sum=logp.sum().item(), gw_norm=weight.grad.norm().item(),
                          gh_norm=hidden.grad.norm().item())))


def mem_available():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192, help="tokens N (default 8192)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size C (default 1024)")
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936], help="vocab sizes V to run")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: token_logprobs default)")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child[0], *map(int, a.child[1:]))
    if a.chunk_size is None:
        sys.path.insert(0, ROOT)
        import inspect
        from losses import token_logprobs
        a.chunk_size = inspect.signature(token_logprobs).parameters["chunk_size"].default

    gb = 1024 ** 3
    print(f"N={a.n} C={a.hidden} chunk_size={a.chunk_size} fp32 CPU, torch threads default, one run per side")
    print(f"{'V':>7} {'side':>6} {'wall s':>7} {'cpu s':>7} {'peak GiB':>9}")
    for v in a.vocab:
        need = (3 * a.n * v + v * a.hidden) * 4                              # naive: logits' worth x3 + grad_W
        if mem_available() < 1.1 * need + gb:
            print(f"{v:>7} skipped: naive needs ~{need / gb:.1f} GiB, {mem_available() / gb:.1f} GiB available")
            continue
        res = {}
        for side in ("naive", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", side, str(a.n), str(a.hidden), str(v),
                   str(a.chunk_size)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{side} V={v} failed:\n{out.stderr[-2000:]}")
            r = res[side] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{v:>7} {side:>6} {r['wall']:>7.1f} {r['cpu']:>7.1f} {r['peak'] / gb:>9.2f}", flush=True)
        nv, fu = res["naive"], res["fused"]
        agree = max(abs(fu[k] - nv[k]) / max(abs(nv[k]), 1e-12) for k in ("logp_sum", "gw_norm", "gh_norm"))
        print(f"{v:>7} ratio fused/naive: peak {fu['peak'] / nv['peak']:.3f}  wall {fu['wall'] / nv['wall']:.2f}x  "
              f"cpu {fu['cpu'] / nv['cpu']:.2f}x  (results agree to rel {agree:.1e})", flush=True)


if __name__ == "__main__":
    main()
