"""Our KV-cache sampler (rollout.py) versus transformers' generate, same weights, same CPU, one process.

(a) multi-turn: P=2 Sokoban levels x G=4 samples x 8 turns. Ours: rollout() (prompts prefilled once, cache kept
    across turns, observations appended as blocks). Baseline: each turn re-render every conversation with the
    chat template, re-tokenize it, and call HF generate on the left-padded batch (what a naive agent loop does).
(b) single-turn: B=16 chat prompts, 64 new tokens, greedy. Ours: generate(). Baseline: HF generate (KV cache).
(c) our decode step at B=1 and B=16 (per new token of generate(), sampling included) against the physical bound:
    the larger of weight bytes / copy bandwidth (a 256 MB numpy copy: bytes copied / time) and 2 x parameters x B
    FLOPs / fp32 matmul peak (2048^3), both measured in this process, before and after the steps.
Both sides are forced to the same number of new tokens per turn (eos forbidden until the budget), so the work is
the same whatever gets sampled. (a) runs ours, HF, ours, HF, ours and compares each HF loop with the mean of ours
around it; (b) alternates and keeps each side's best. Ours is timed twice in the same process, with the compiled
decode step and with the eager one (R.COMPILE, read at every step; rollout's default "auto" is the compiled step
wherever torch.compile works), interleaved so that a drift of the CPU's speed hits both; --no-compile: eager only.
The compile happens in the warm-up and its time is printed. About 11 minutes on 2 free cores (the HF loop of (a) on
SmolLM2 is most of it); when other jobs share the CPU, 2-thread runs slow down erratically: use --threads 1 there.
Usage: python bench/bench_rollout.py [--models smollm2-135m,tiny] [--parts abc] [--threads N] [--no-compile]
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import envs  # noqa: E402
import model as M  # noqa: E402
import rollout as R  # noqa: E402

P, G, TURNS = 2, 4, 8


def make_env():
    return envs.Sokoban(dim=(6, 6), num_boxes=1, max_turns=TURNS)


def hf_multi_turn(hf, tok, seeds, new_tokens, generator_seed):
    """The naive loop: the whole chat is re-rendered and re-tokenized every turn."""
    torch.manual_seed(generator_seed)
    envs_ = [make_env() for _ in range(len(seeds) * G)]
    chats = []
    for i, env in enumerate(envs_):
        obs = env.reset(seeds[i // G])
        chats.append([{"role": "system", "content": env.task_prompt()}, {"role": "user", "content": obs}])
    done = [False] * len(envs_)
    for _ in range(TURNS):
        live = [i for i in range(len(envs_)) if not done[i]]
        if not live:
            break
        texts = [tok.apply_chat_template(chats[i], tokenize=False, add_generation_prompt=True) for i in live]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = hf.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, reply in zip(live, replies):
            obs, _, done[i], _ = envs_[i].step(reply)
            chats[i] += [{"role": "assistant", "content": reply}, {"role": "user", "content": obs}]
    return len(envs_)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def with_step(compiled, fn):
    """fn() with our decode step compiled (True) or eager (False): R.COMPILE is read at every step."""
    R.COMPILE = compiled
    return timed(fn)


def bench(name, new_tokens, parts, paths):
    model, tok = M.load(name)
    model.eval()
    with tempfile.TemporaryDirectory() as d:  # the very same weights for transformers
        folder = M.smollm2_folder() if name == "smollm2-135m" else d
        if name != "smollm2-135m":
            M.save(model, tok, d)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seeds = envs.task_set("eval", P)
    # warm up both sides (first-call allocations, kernel selection; ours: the compile, B = 1 and B > 1)
    for compiled in paths:
        t = with_step(compiled, lambda: (R.generate(model, tok, ["hi"], 3, min_new_tokens=3),
                                         R.generate(model, tok, ["hi", "hello"], 3, min_new_tokens=3)))[1]
        print(f"[{name}] warm-up of ours, {STEP[compiled]} decode step: {t:.1f} s", flush=True)
    if True in paths and not R._compiled:
        print(f"[{name}] compiling failed: the 'compiled' rows below are eager", flush=True)
    hf.generate(**tok(["hi"], return_tensors="pt"), max_new_tokens=2, pad_token_id=tok.pad_token_id)

    if "a" in parts:
        multi_turn(name, model, tok, hf, seeds, new_tokens, paths)
    if "b" in parts:
        single_turn(name, model, tok, hf, paths)
    if "c" in parts:
        decode_vs_bound(name, model, tok, paths)


STEP = {True: "compiled", False: "eager"}


def ours_multi_turn(model, tok, seeds, new_tokens):
    """Our side of (a): one rollout, new_tokens forced per turn (also profiled by bench/profile_rollout.py)."""
    return R.rollout(model, tok, make_env, seeds, G, TURNS, new_tokens, generator=torch.Generator().manual_seed(0),
                     min_new_tokens=new_tokens)


def multi_turn(name, model, tok, hf, seeds, new_tokens, paths, rounds=2):
    """Ours, HF, ours, HF, ours: each HF loop (~100 s) is bracketed by runs of ours, whose mean is compared with it
    (a drift of the CPU's speed hits both); the ratio is over all rounds, and each round's is printed."""
    ours = lambda: ours_multi_turn(model, tok, seeds, new_tokens)  # noqa: E731
    t_ours, t_hf = {c: [] for c in paths}, []
    for r in range(rounds + 1):
        for c in paths:
            eps, t = with_step(c, ours)
            t_ours[c].append(t)
        if r < rounds:
            n, t = timed(lambda: hf_multi_turn(hf, tok, seeds, new_tokens, r))
            t_hf.append(t)
    turns = sum(len(ep.turn_spans) for ep in eps)
    for c in paths:
        bracket = [(a + b) / 2 for a, b in zip(t_ours[c], t_ours[c][1:])]  # ours around HF round r
        each = ", ".join(f"{h / o * len(eps) / n:.2f}x" for h, o in zip(t_hf, bracket))
        print(f"[{name}] (a) multi-turn P={P} G={G} {TURNS} turns, {new_tokens} new tokens/turn, "
              f"{turns} turns played, mean episode {sum(len(e.tokens) for e in eps) / len(eps):.0f} tokens: "
              f"ours ({STEP[c]}) {len(eps) * len(bracket) / sum(bracket):.3f} ep/s "
              f"({' / '.join(f'{t:.1f}' for t in t_ours[c])} s), HF generate loop {n * len(t_hf) / sum(t_hf):.3f} "
              f"ep/s ({' / '.join(f'{t:.1f}' for t in t_hf)} s) -> ratio "
              f"{sum(t_hf) / sum(bracket) * len(eps) / n:.2f}x over {rounds} rounds ({each}) (goal >= 5x)", flush=True)


def single_turn(name, model, tok, hf, paths):
    questions = ["What is the capital of France?", "Name a prime number.", "Explain gravity briefly.",
                 "Write a haiku about the sea.", "What is 2 + 3?", "Describe Sokoban in one sentence.",
                 "Give three colours.", "Why is the sky blue?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q * (1 + i // 8)}], tokenize=False,
                                       add_generation_prompt=True) for i, q in enumerate(questions * 2)]
    B, N = len(prompts), 64
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    t_ours, t_hf = {c: [] for c in paths}, []  # alternate twice and keep each side's best: the CPU's speed drifts
    for _ in range(2):
        for c in paths:
            t_ours[c].append(with_step(c, lambda: R.generate(model, tok, prompts, N, min_new_tokens=N))[1])
        out, t = timed(lambda: hf.generate(**enc, do_sample=False, max_new_tokens=N, min_new_tokens=N,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        assert out.shape[1] - enc["input_ids"].shape[1] == N
        t_hf.append(t)
    t_hf = min(t_hf)
    for c in paths:
        t = min(t_ours[c])
        print(f"[{name}] (b) single-turn B={B}, {N} new tokens, greedy: ours ({STEP[c]}) {B * N / t:.1f} tok/s "
              f"({t:.2f} s), HF generate {B * N / t_hf:.1f} tok/s ({t_hf:.2f} s) -> ratio {t_hf / t:.2f}x "
              f"(goal >= 1.3x; best of 2 each)", flush=True)


def hardware():
    """(copy bandwidth in bytes/s, fp32 matmul peak in FLOP/s), best of 5 each."""
    src = np.ones(64 * 2**20, dtype=np.float32)  # 256 MB
    dst, a, b = np.empty_like(src), torch.randn(2048, 2048), torch.randn(2048, 2048)
    copy = min(timed(lambda: np.copyto(dst, src))[1] for _ in range(5))
    mm = min(timed(lambda: a @ b)[1] for _ in range(5))
    return src.nbytes / copy, 2 * 2048**3 / mm


def decode_vs_bound(name, model, tok, paths, N=32):
    bw, peak = hardware()
    n_params = sum(p.numel() for p in model.parameters())  # the tied embedding once: the head reads it
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps = {}
    for B in (1, 16):
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Question {i}: why?"}], tokenize=False,
                                           add_generation_prompt=True) for i in range(B)]
        gen = lambda n: R.generate(model, tok, prompts, n, min_new_tokens=n)  # noqa: E731
        # per new token: (N + 1 tokens) - (1 token) cancels the prefill; best of 3, the paths interleaved
        runs = [(c, with_step(c, lambda: gen(N + 1))[1] - with_step(c, lambda: gen(1))[1]) for _ in range(3)
                for c in paths]
        for c in paths:
            steps[B, c] = min(t for c2, t in runs if c2 == c) / N
    bw2, peak2 = hardware()
    bw, peak = max(bw, bw2), max(peak, peak2)  # before and after: the better of each
    print(f"[{name}] (c) copy bandwidth {bw / 1e9:.1f} GB/s, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s, "
          f"{weight_bytes / 1e6:.0f} MB of weights, {n_params / 1e6:.1f}M parameters", flush=True)
    for (B, c), t in steps.items():
        mem, flops = weight_bytes / bw, 2 * n_params * B / peak
        bound = max(mem, flops)
        print(f"[{name}] (c) decode step ({STEP[c]}) B={B}: {t * 1e3:.1f} ms, bound {bound * 1e3:.1f} ms "
              f"({'weights' if mem >= flops else 'FLOPs'}; weights {mem * 1e3:.1f} ms, FLOPs {flops * 1e3:.1f} ms) "
              f"-> {t / bound:.2f}x the bound (goal <= {2.0 if B == 1 else 2.5}x)", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,tiny", help="comma-separated model names (default: both)")
    ap.add_argument("--new-tokens", type=int, default=24, help="tokens sampled per turn in (a) (default 24)")
    ap.add_argument("--parts", default="abc",
                    help="which measurements: a (multi-turn), b (single-turn), c (decode step vs bound); default abc")
    ap.add_argument("--threads", type=int, default=0, help="torch threads, both sides (default: torch's choice)")
    ap.add_argument("--no-compile", action="store_true", help="ours: the eager decode step only (default: both)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start "
          f"{os.getloadavg()[0]:.1f} (the CPU is shared: both sides run back to back in this process)")
    for name in args.models.split(","):
        bench(name, args.new_tokens, args.parts, [False] if args.no_compile else [True, False])
