"""Where a decode step's time goes: torch.profiler over generate()'s decode steps at B = 1 and B = 16.

Prints, per batch size, the ms per new token and the operators that take most of it (self CPU time), grouped
into: matmuls (linear / mm / bmm: the weights), attention (sdpa and its softmax), the mask, cache writes
(index_copy / copy / slicing), sampling (logsumexp, gather, argmax / multinomial), the compiled graph (inductor
kernels, counted as one), the rest (Python and small ops: the rows not named). The prefill is cancelled as in
bench_rollout (c): a (N + 1)-token run minus a 1-token run. Needs the machine to itself.
Usage: python bench/profile_decode.py [--model smollm2-135m] [--no-compile] [--steps 32] [--rows 15]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import model as M  # noqa: E402
import rollout as R  # noqa: E402

GROUPS = [("matmul", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")),
          ("attention", ("scaled_dot_product", "softmax", "_safe_softmax")),
          ("cache write", ("index_copy", "aten::copy_", "aten::slice", "aten::select", "aten::index_put")),
          ("sampling", ("logsumexp", "aten::gather", "argmax", "multinomial", "aten::sort", "aten::rand",
                        "index_fill", "aten::where", "aten::item", "_local_scalar_dense")),
          ("compiled graph", ("CompiledFunction", "Torch-Compiled Region", "inductor", "cpp_fused",
                              "TorchDynamo")),
          ("norm / rope / act", ("aten::mul", "aten::add", "aten::rsqrt", "aten::pow", "aten::mean", "aten::silu",
                                 "aten::cat", "aten::neg", "aten::cos", "aten::sin", "aten::embedding")),
          ("mask", ("aten::arange", "aten::eq", "aten::bitwise_or", "aten::le", "aten::logical_or"))]


def group(name):
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name (default smollm2-135m)")
    ap.add_argument("--no-compile", action="store_true", help="profile the eager decode step")
    ap.add_argument("--steps", type=int, default=32, help="decode steps profiled (default 32)")
    ap.add_argument("--rows", type=int, default=15, help="operators listed per batch size (default 15)")
    args = ap.parse_args()
    if hasattr(R, "COMPILE"):  # older checkouts have no compiled step
        R.COMPILE = not args.no_compile
    model, tok = M.load(args.model)
    model.eval()
    R.generate(model, tok, ["hi"], 3), R.generate(model, tok, ["hi", "hello"], 3)  # warm-up (and compile)
    print(f"{args.model}: {'compiled' if getattr(R, '_compiled', None) else 'eager'} decode step, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    for B in (1, 16):
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Question {i}: why?"}], tokenize=False,
                                           add_generation_prompt=True) for i in range(B)]
        gen = lambda n: R.generate(model, tok, prompts, n, min_new_tokens=n)  # noqa: E731
        gen(args.steps + 1)
        tables = []
        for n in (args.steps + 1, 1):  # the difference is the decode steps alone
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                gen(n)
                wall = time.perf_counter() - t
            tables.append(({e.key: e.self_cpu_time_total for e in prof.key_averages()}, wall))
        (full, w_full), (one, w_one) = tables
        per_op = {k: (v - one.get(k, 0)) / args.steps / 1e3 for k, v in full.items()}  # ms per step
        step_ms = (w_full - w_one) / args.steps * 1e3
        sums = {}
        for k, v in per_op.items():
            sums[group(k)] = sums.get(group(k), 0) + v
        print(f"\nB={B}: {step_ms:.1f} ms per decode step under the profiler (profiled self CPU time "
              f"{sum(per_op.values()):.1f} ms)")
        print("  by group: " + ", ".join(f"{g} {v:.1f} ms" for g, v in sorted(sums.items(), key=lambda x: -x[1])))
        for k, v in sorted(per_op.items(), key=lambda x: -x[1])[:args.rows]:
            print(f"  {v:7.2f} ms  {k[:90]}")


if __name__ == "__main__":
    main()
