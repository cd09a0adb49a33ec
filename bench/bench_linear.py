"""Weight products on this CPU: why the sampler (decode steps, prefill blocks) uses oneDNN-packed weights.

(1) isolated: the decode step's products of one SmolLM2-135M-shaped model, in model order (30 layers x qkv, out,
    fused gate/up, down, then the head: 121 matrices, 538 MB, random weights), at 1 / 4 / 16 / 64 rows (decode
    steps) and 256 / 768 rows (the sampler's prefill blocks: packed too), computed as F.linear (MKL), (W x^T)^T
    (MKL, transposed), MKL's packed sgemm, oneDNN unpacked and oneDNN packed; median of 7 sweeps each.
(2) in the decode step: generate()'s ms per new token on SmolLM2-135M at B = 1 and 16 with the packed weights and
    without them (model.packed_weights made a no-op), interleaved, best of 3.
About 3 minutes on 2 free cores; needs the machine to itself.
Usage: python bench/bench_linear.py [--rows 1,4,16,64,256,768] [--no-step]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402
import rollout as R  # noqa: E402

C, I, QKV, V, L = 576, 1536, 960, 49152, 30  # SmolLM2-135M: hidden, intermediate, q + k + v, vocab, layers
dnn, mkl = torch.ops.mkldnn, torch.ops.mkl
METHODS = {  # name -> (pack(w, rows) or None, product(x, w, packed))
    "F.linear (MKL)": (None, lambda x, w, p: F.linear(x, w)),
    "(W x^T)^T (MKL)": (None, lambda x, w, p: (w @ x.T).T),
    "MKL packed": (lambda w, m: mkl._mkl_reorder_linear_weight(w, m),
                   lambda x, w, p: mkl._mkl_linear(x, p, w, None, x.shape[0])),
    "oneDNN": (None, lambda x, w, p: dnn._linear_pointwise(x, w, None, "none", [], "")),
    "oneDNN packed": (lambda w, m: dnn._reorder_linear_weight(w, m),
                      lambda x, w, p: dnn._linear_pointwise(x, p, None, "none", [], "")),
}


def isolated(rows_list):
    torch.manual_seed(0)
    ws = [0.02 * torch.randn(n, k) for _ in range(L) for n, k in ((QKV, C), (C, C), (2 * I, C), (C, I))]
    ws.append(0.02 * torch.randn(V, C))
    print(f"(1) {len(ws)} weight matrices, {sum(w.numel() for w in ws) * 4 / 1e6:.0f} MB, median of 7 sweeps (ms)")
    print("| rows | " + " | ".join(METHODS) + " |\n|---|" + "---|" * len(METHODS))
    for m in rows_list:
        xs = {C: torch.randn(m, C), I: torch.randn(m, I)}
        cells = []
        for pack, prod in METHODS.values():
            packed = [pack(w, m) if pack else None for w in ws]
            times = []
            for _ in range(8):  # the first sweep warms up
                t = time.perf_counter()
                for w, p in zip(ws, packed):
                    prod(xs[w.shape[1]], w, p)
                times.append(time.perf_counter() - t)
            cells.append(sorted(times[1:])[3] * 1e3)
            del packed
        print(f"| {m} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


def in_the_step(N=32):
    model, tok = M.load("smollm2-135m")
    model.eval()
    R.COMPILE = False
    real = torch.backends.mkldnn.is_available
    for B in (1, 16):
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Question {i}: why?"}], tokenize=False,
                                           add_generation_prompt=True) for i in range(B)]
        gen = lambda n: R.generate(model, tok, prompts, n, min_new_tokens=n)  # noqa: E731
        best = {}
        for _ in range(3):
            for packed in (True, False):
                torch.backends.mkldnn.is_available = real if packed else (lambda: False)  # packed_weights: no-op
                t0 = time.perf_counter()
                gen(N + 1)
                t1 = time.perf_counter()
                gen(1)  # (N + 1 tokens) - (1 token): the prefill cancels
                ms = ((t1 - t0) - (time.perf_counter() - t1)) / N * 1e3
                best[packed] = min(best.get(packed, ms), ms)
        torch.backends.mkldnn.is_available = real
        print(f"(2) decode step B={B}: packed {best[True]:.1f} ms, F.linear {best[False]:.1f} ms -> "
              f"{best[False] / best[True]:.2f}x", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64,256,768",
                    help="rows of the isolated products (default 1,4,16,64,256,768)")
    ap.add_argument("--no-step", action="store_true", help="skip (2), the decode step on SmolLM2")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    isolated([int(r) for r in args.rows.split(",")])
    if not args.no_step:
        in_the_step()
