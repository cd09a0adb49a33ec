"""Where a multi-turn rollout's time goes: torch.profiler over one rollout of bench_rollout's benchmark (a).

The rollout (bench_rollout.ours_multi_turn: P=2 Sokoban levels x G=4 samples x 8 turns of 24 tokens, eos
forbidden until the budget) runs once to warm up, then once timed without the profiler and once under it. Each
operator's self CPU time is attributed to the phase it ran in: "prefill" (the forwards that write a block into the
cache: the prompts, then each turn's observations), "decode" (the decode steps) or "other" (weight packing, cache
growth between forwards, sampling, env steps, tokenizing). Prints the wall times, then per phase its total and its
heaviest operators; "python" is the phase's own time outside operators (module calls, argument handling). Needs
the machine to itself.
Usage: python bench/profile_rollout.py [--model smollm2-135m] [--new-tokens 24] [--rows 10] [--no-compile]
"""
import argparse
import collections
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import bench_rollout as BR  # noqa: E402
import envs  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

wall = collections.Counter()  # phase -> seconds of wall time in its calls


def marked(fn, phase):
    """fn, its calls recorded as a profiler range named phase (and timed)."""
    def wrapped(*args, **kwargs):
        t = time.perf_counter()
        with record_function(phase):
            out = fn(*args, **kwargs)
        wall[phase] += time.perf_counter() - t
        return out
    return wrapped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name (default smollm2-135m)")
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens sampled per turn (default 24, as bench_rollout)")
    ap.add_argument("--rows", type=int, default=10, help="operators listed per phase (default 10)")
    ap.add_argument("--no-compile", action="store_true", help="the eager decode step (default: compiled, as rollout)")
    args = ap.parse_args()
    R.COMPILE = not args.no_compile
    model, tok = M.load(args.model)
    model.eval()
    seeds = envs.task_set("eval", BR.P)
    R._forward_last, R.decode_step = marked(R._forward_last, "prefill"), marked(R.decode_step, "decode")
    play = lambda: BR.ours_multi_turn(model, tok, seeds, args.new_tokens)  # noqa: E731
    play()
    wall.clear()
    t = time.perf_counter()
    eps = play()
    total = time.perf_counter() - t
    print(f"{args.model}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}: a rollout of "
          f"{len(eps)} episodes, {sum(len(e.tokens) for e in eps)} tokens in {total:.2f} s: prefill "
          f"{wall['prefill']:.2f} s, decode {wall['decode']:.2f} s, other {total - sum(wall.values()):.2f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        play()
    ops = collections.defaultdict(collections.Counter)  # phase -> operator -> self seconds
    for e in prof.events():
        p = e
        while p is not None and p.name not in ("prefill", "decode"):
            p = p.cpu_parent
        phase = p.name if p is not None else "other"
        ops[phase]["python" if e.name == phase else e.name] += e.self_cpu_time_total / 1e6
    for phase in ("prefill", "decode", "other"):
        print(f"\n{phase}: {sum(ops[phase].values()):.2f} s of self CPU time under the profiler")
        for name, s in ops[phase].most_common(args.rows):
            print(f"  {s:6.2f} s  {name[:80]}")


if __name__ == "__main__":
    main()
