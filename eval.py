"""Evaluate a model on the fixed held-out task set, write a report, and plot training curves.

    python eval.py --model smollm2-135m                  # the base model, greedy, 32 evaluation puzzles
    python eval.py --model runs/default/ckpt-000040      # a checkpoint written by train.py
    python eval.py --model runs/default/ckpt-000040 --split eval train --out runs/default   # + training levels
    python eval.py --plot runs/default/metrics.jsonl     # training curves to PNG

Metrics (Sokoban): Acc = % of puzzles solved, Comp = mean % of boxes on targets at the end, mean turns,
invalid-output rate (turns whose answer could not be parsed), and on solved puzzles the ratio of moves taken to
the optimal number of moves (from `envs.solve`; only the report sees the solver, never the agent).

Deliberate simplifications: evaluation is greedy by default (temperature 0) and uses the plain task prompt, never
a skill; in a torchrun job each rank evaluates a slice of the set and train.py gathers the slices.
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

import envs
import rollout
from model import autocast, load as load_model


def env_overrides(args, split="train"):
    """make_env overrides from train.py's or eval.py's flags (AppWorld evaluates on its `dev` split)."""
    kw = {"max_turns": args.max_turns}
    if args.env.startswith("sokoban"):
        kw.update(parse=args.parse, reward=args.reward)
    if args.env == "appworld":
        kw["split"] = "dev" if split == "eval" else "train"
    return kw


def evaluate(model, tokenizer, env_name, seeds, max_new_tokens, env_kwargs, temperature=0.0, batch_size=16,
             seed=0, progress=False):
    """Play each seed once, plain prompt, env_kwargs to envs.make_env -> one plain dict per puzzle, seeds' order."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    make_env = lambda: envs.make_env(env_name, **env_kwargs)  # noqa: E731
    max_turns = make_env().max_turns
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    results = []
    for chunk in tqdm(chunks, desc="eval", unit="batch", dynamic_ncols=True, disable=not progress):
        eps = rollout.rollout(model, tokenizer, make_env, list(chunk), group_size=1, max_turns=max_turns,
                              max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
        results += [episode_result(ep, make_env, sokoban=env_name.startswith("sokoban")) for ep in eps]
    return results


def episode_result(ep, make_env, sokoban=True):
    """Reduce one evaluation Episode to the numbers the report needs."""
    res = {"task_id": ep.task_id, "success": bool(ep.success), "completion": float(ep.completion),
           "reward": float(ep.reward), "turns": len(ep.responses), "truncated": bool(ep.truncated)}
    if sokoban:  # other environments (AppWorld) have no invalid-move or optimal-length notion here
        facts = envs.sokoban_facts(ep.history)
        res.update(invalid_turns=facts["invalid_turns"], moves=sum(facts["moved"]))
        if ep.success:  # optimal length from the initial room of this seed (the report only)
            env = make_env()
            env.reset(ep.task_id)
            best = envs.solve(env.room_fixed, env.room_state, max_depth=100)
            res["optimal_moves"] = len(best) if best else None
    return res


def summarize(results):
    """Aggregate per-puzzle results into the report's numbers (percentages where the paper uses them)."""
    n = max(len(results), 1)
    turns = sum(r["turns"] for r in results)
    out = {"n": len(results), "acc": 100.0 * sum(r["success"] for r in results) / n,
           "comp": 100.0 * sum(r["completion"] for r in results) / n, "mean_turns": turns / n,
           "mean_reward": sum(r["reward"] for r in results) / n}
    if all("invalid_turns" in r for r in results) and turns:
        out["invalid_rate"] = sum(r["invalid_turns"] for r in results) / turns
    ratios = [r["moves"] / r["optimal_moves"] for r in results if r["success"] and r.get("optimal_moves")]
    out["opt_ratio"] = sum(ratios) / len(ratios) if ratios else None
    return out


def markdown_table(rows):
    """rows: list of (name, summary dict) -> a markdown table with the paper's columns."""
    lines = ["| model | n | Acc % | Comp % | mean turns | invalid rate | moves / optimal |",
             "|---|---|---|---|---|---|---|"]
    for name, s in rows:
        inv = f"{s['invalid_rate']:.3f}" if s.get("invalid_rate") is not None else "-"
        opt = f"{s['opt_ratio']:.2f}" if s.get("opt_ratio") is not None else "-"
        lines.append(f"| {name} | {s['n']} | {s['acc']:.1f} | {s['comp']:.1f} | {s['mean_turns']:.2f} | {inv} | {opt} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir, name, results, summary, tag="eval"):
    """Write `{tag}.json` (summary + per-puzzle results) and `{tag}.md` (the table) into out_dir, atomically."""
    os.makedirs(out_dir, exist_ok=True)
    for path, text in [(os.path.join(out_dir, f"{tag}.json"),
                        json.dumps({"model": name, "summary": summary, "results": results}, indent=1)),
                       (os.path.join(out_dir, f"{tag}.md"), markdown_table([(name, summary)]))]:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


PLOT_KEYS = [("reward", "mean episode reward"), ("success", "training success rate"),
             ("loss_grpo", "GRPO loss"), ("loss_sdl", "SDL loss"), ("gap", "teacher - student log-prob"),
             ("teacher_adv_corr", "corr(A, teacher - student gap)"),
             ("entropy", "entropy (nats/token)"), ("eval_acc", "eval Acc %"), ("eval_comp", "eval Comp %")]


def pyplot():
    import matplotlib  # in requirements.txt; imported here so that evaluation alone never loads it
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def plot(metrics_path, out_png=None):
    """Draw the training curves of a metrics.jsonl into one PNG."""
    plt = pyplot()
    if not os.path.exists(metrics_path):
        raise SystemExit(f"no such metrics file: {metrics_path}")
    rows = read_jsonl(metrics_path)
    keys = [(k, t) for k, t in PLOT_KEYS if any(r.get(k) is not None for r in rows)]
    if not keys:
        raise SystemExit(f"{metrics_path} has none of the plotted metrics: {[k for k, _ in PLOT_KEYS]}")
    cols = min(4, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, (k, title) in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = out_png or os.path.splitext(metrics_path)[0] + ".png"
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a model on the fixed Sokoban evaluation set, or plot curves.")
    p.add_argument("--model", default="smollm2-135m", help="'tiny', 'smollm2-135m', an HF id, or a checkpoint folder")
    p.add_argument("--env", default="sokoban", help="environment name (envs.make_env); default sokoban (6x6, 1 box)")
    p.add_argument("--n", type=int, default=32, help="number of evaluation puzzles (first n of the fixed set)")
    p.add_argument("--split", nargs="+", default=["eval"], choices=["eval", "train"],
                   help="task sets: eval (held out: eval.json/.md) and/or train (training levels: eval_train.json/.md)")
    p.add_argument("--train-n", type=int, default=None,
                   help="training puzzles for --split train (first n of the training set; default: all of it)")
    p.add_argument("--max-turns", type=int, default=3, help="turns per episode (as train.py)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="token budget per model turn (as train.py)")
    p.add_argument("--reward", default="completion", choices=["completion", "shaped"],
                   help="Sokoban episode reward (as train.py); Acc and Comp do not depend on it")
    p.add_argument("--parse", default="lenient", choices=["strict", "lenient"],
                   help="Sokoban parsing (as train.py): strict = only <action>..</action>; lenient = move words too")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=16, help="puzzles played at once")
    p.add_argument("--out", default="eval_out", help="folder for eval.json and eval.md")
    p.add_argument("--plot", metavar="METRICS_JSONL", help="instead of evaluating, plot this metrics.jsonl to PNG")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true",
                   help="decode eagerly (default: compile the decode step where torch.compile works)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (the default; a failed compile warns once, then decodes eagerly)")
    args = p.parse_args(argv)
    if args.no_compile or args.compile:
        rollout.COMPILE = args.compile and not args.no_compile
    if args.plot:
        print("wrote", plot(args.plot))
        return
    try:  # task_set refuses --n / --train-n outside 1..size of the set
        seeds = {s: envs.task_set(s, args.n if s == "eval" else args.train_n, env=args.env) for s in args.split}
        model, tok = load_model(args.model, device=args.device)
        rollout.template_pieces(tok, args.model)  # a chat template the sampler cannot follow: one error line
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    for split in dict.fromkeys(args.split):
        with torch.no_grad(), autocast(args.device):
            results = evaluate(model, tok, args.env, seeds[split], args.max_new_tokens, env_overrides(args, split),
                               temperature=args.temperature, batch_size=args.batch_size, progress=True)
        summary = summarize(results)
        name = f"{args.model} ({args.parse} parsing{', training levels' if split == 'train' else ''})"
        write_report(args.out, name, results, summary, tag="eval" if split == "eval" else "eval_train")
        print(markdown_table([(f"{args.model} [{split}]", summary)]))


if __name__ == "__main__":
    main()
