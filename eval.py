"""Evaluate a model on the fixed held-out task set, write a report, and plot training curves.

    python eval.py --model smollm2-135m                  # the base model, greedy, 128 evaluation puzzles
    python eval.py --model runs/default/ckpt-000040      # a checkpoint written by train.py
    python eval.py --model runs/default/ckpt-000040 --split eval train --out runs/default   # + training levels
    python eval.py --plot runs/default/metrics.jsonl     # training curves to PNG (needs matplotlib)
    python eval.py --compare runs/study/*/ --out runs/study   # methods x seeds: compare.md, compare.png

Metrics (Sokoban): Acc = % of puzzles solved, Comp = mean % of boxes on targets at the end, mean turns,
invalid-output rate (turns whose answer could not be parsed), and on solved puzzles the ratio of moves taken to
the optimal number of moves (from `envs.solve`; only the report sees the solver, never the agent).

Deliberate simplifications: evaluation is greedy by default (temperature 0) and uses the plain task prompt, never
a skill; in a torchrun job each rank evaluates a slice of the set and train.py gathers the slices. The comparison
reads only each run folder's small text files (run.json, args.json, metrics.jsonl, eval.json, eval_train.json), so
committed copies of them reproduce it; its spread is the sample std (n - 1) and the min-max over seeds, nothing
fancier (3 seeds support no confidence interval worth printing).
"""
import argparse
import json
import os
import statistics
import sys

import torch

import envs
import model as M
import rollout as R


def env_overrides(args, split="train"):
    """make_env overrides from train.py's or eval.py's flags: the turn budget, Sokoban's parsing mode and reward,
    AppWorld's split (evaluation on `dev`)."""
    kw = {"max_turns": args.max_turns}
    if args.env.startswith("sokoban"):
        kw["parse"] = args.parse
        kw["reward"] = args.reward
    if args.env == "appworld":
        kw["split"] = "dev" if split == "eval" else "train"
    return kw


def evaluate(model, tokenizer, env_name, seeds, max_new_tokens, env_kwargs, temperature=0.0, batch_size=16,
             seed=0, progress=False):
    """Play each seed once (plain prompt). env_kwargs go to envs.make_env (max_turns, parse, ...).
    Returns one plain dict per puzzle, in the order of `seeds`."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    make_env = lambda: envs.make_env(env_name, **env_kwargs)  # noqa: E731
    max_turns = make_env().max_turns
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="eval", unit="batch", dynamic_ncols=True)
    results = []
    for chunk in chunks:
        eps = R.rollout(model, tokenizer, make_env, list(chunk), group_size=1, max_turns=max_turns,
                        max_new_tokens=max_new_tokens, temperature=temperature, generator=gen)
        results += [episode_result(ep, make_env, sokoban=env_name.startswith("sokoban")) for ep in eps]
    return results


def episode_result(ep, make_env, sokoban=True):
    """Reduce one evaluation Episode to the numbers the report needs."""
    res = {"task_id": ep.task_id, "success": bool(ep.success), "completion": float(ep.completion),
           "reward": float(ep.reward), "turns": len(ep.responses), "truncated": bool(ep.truncated)}
    if sokoban:  # other environments (AppWorld) have no invalid-move or optimal-length notion here
        facts = envs.sokoban_facts(ep.history)
        res["invalid_turns"] = facts["invalid_turns"]
        res["moves"] = sum(facts["moved"])
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
    out = {"n": len(results),
           "acc": 100.0 * sum(r["success"] for r in results) / n,
           "comp": 100.0 * sum(r["completion"] for r in results) / n,
           "mean_turns": turns / n,
           "mean_reward": sum(r["reward"] for r in results) / n}
    if all("invalid_turns" in r for r in results) and turns:
        out["invalid_rate"] = sum(r["invalid_turns"] for r in results) / turns
    ratios = [r["moves"] / r["optimal_moves"] for r in results
              if r["success"] and r.get("optimal_moves")]
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


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib, an optional extra: pip install matplotlib")
    return plt


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def plot(metrics_path, out_png=None):
    """Draw the training curves of a metrics.jsonl into one PNG (matplotlib is an optional extra)."""
    plt = _pyplot()
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
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = out_png or os.path.splitext(metrics_path)[0] + ".png"
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def load_run(run_dir):
    """One run folder (or a base-model evaluation folder) -> the numbers the comparison needs."""
    def read(name):
        path = os.path.join(run_dir, name)
        return json.load(open(path)) if os.path.exists(path) else None
    run, args, ev, tr = read("run.json") or {}, read("args.json"), read("eval.json"), read("eval_train.json")
    if ev is None:
        raise SystemExit(f"error: {run_dir} has no eval.json (not a finished run or evaluation)")
    if args:  # a training run not made by study.py: name it by its method flags
        label = args["method"] + ("-frozen" if args.get("teacher") == "frozen" else "") + \
            ("-offpolicy" if args.get("rollout_owner") == "teacher" else "")
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    curve = [(m["step"], m["eval_acc"]) for m in metrics if m.get("eval_acc") is not None]
    return {"name": run.get("name") or (label if args else ev["model"]), "eval": ev["summary"],
            "train": tr and tr["summary"], "curve": curve, "wall_s": run.get("wall_s"), "base": not args,
            "diag": {k: step_mean(metrics, k) for k in DIAGNOSTICS}}


# training diagnostics compared per method: metrics.jsonl key (a.b = key b of dict a) -> column title
DIAGNOSTICS = {"success": "rollout success", "frac_zero_var": "zero-variance groups", "entropy": "entropy",
               "distill_frac": "distilled episodes", "gap": "gap", "teacher_adv_corr": "teacher-adv. corr",
               "skills.hit_rate": "skill hit rate", "step_time": "s / step"}


def step_mean(metrics, key):
    """Mean over the training steps that logged `key` as a number (None when none did)."""
    vals = []
    for m in metrics:
        for part in key.split("."):
            m = m.get(part) if isinstance(m, dict) else None
        if isinstance(m, (int, float)) and not isinstance(m, bool):
            vals.append(m)
    return statistics.mean(vals) if vals else None


def spread(xs):
    """'mean ± std (min-max)' over seeds (sample std); the mean alone for one value; '-' for none."""
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return f"{xs[0]:.1f}" if xs else "-"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def compare(run_dirs, out_dir):
    """Group runs by name (method variant), write compare.md (the table) and compare.png (eval Acc against step:
    the mean over seeds as a line, their min-max as bars and a band, the base model as a dashed line and as every
    curve's step 0); return the table."""
    groups = {}
    for d in run_dirs:
        r = load_run(d)
        groups.setdefault(r["name"], []).append(r)
    cols = lambda rs, split, k: [r[split][k] if r[split] else None for r in rs]  # noqa: E731
    ns = lambda rs, split: "/".join(sorted({str(r[split]["n"]) for r in rs if r[split]})) or "-"  # noqa: E731
    lines = ["| method | seeds | eval n | Acc % | Comp % | train n | train Acc % | train Comp % | wall / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in sorted(groups.items(), key=lambda kv: not kv[1][0]["base"]):  # base models first
        walls = [r["wall_s"] for r in rs if r["wall_s"] is not None]
        wall = f"{statistics.mean(walls) / 60:.1f} min" if walls else "-"
        lines.append(f"| {name} | {len(rs)} | {ns(rs, 'eval')} | {spread(cols(rs, 'eval', 'acc'))} | "
                     f"{spread(cols(rs, 'eval', 'comp'))} | {ns(rs, 'train')} | {spread(cols(rs, 'train', 'acc'))} | "
                     f"{spread(cols(rs, 'train', 'comp'))} | {wall} |")
    lines += ["", "Training diagnostics: per run the mean over its steps, then the mean over seeds ('-': never logged).",
              "", "| method | " + " | ".join(DIAGNOSTICS.values()) + " |", "|---" * (len(DIAGNOSTICS) + 1) + "|"]
    for name, rs in groups.items():
        if not rs[0]["base"]:
            means = [[r["diag"][k] for r in rs if r["diag"][k] is not None] for k in DIAGNOSTICS]
            lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(v):.3g}" if v else "-" for v in means) + " |")
    table = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table)
    try:
        plt = _pyplot()
    except SystemExit as e:
        print(f"no compare.png: {e}")
        return table
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bases = [r["eval"]["acc"] for rs in groups.values() for r in rs if r["base"]]
    for i, (name, rs) in enumerate(groups.items()):
        # every run starts from the base model: with a base row, it is each curve's step 0
        curves = [{**({0: statistics.mean(bases)} if bases else {}), **dict(r["curve"])} for r in rs if r["curve"]]
        if rs[0]["base"]:
            ax.axhline(statistics.mean(r["eval"]["acc"] for r in rs), ls="--", color="gray", label=name)
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))  # steps every seed has evaluated at
        ys = [[c[s] for s in steps] for c in curves]  # (seeds, steps)
        mean, lo, hi = ([f(col) for col in zip(*ys)] for f in (statistics.mean, min, max))
        x = [s + 0.06 * (i - len(groups) / 2) * max(steps, default=1) / 10 for s in steps]  # side by side
        line, = ax.plot(x, mean, marker=".", label=f"{name} ({len(ys)} seeds)")
        ax.errorbar(x, mean, yerr=[[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]], fmt="none",
                    capsize=3, color=line.get_color())
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
    ax.set(xlabel="step", ylabel="eval Acc %", title="eval Acc: mean over seeds, bars and band = min-max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare.png"), dpi=100)
    plt.close(fig)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a model on the fixed Sokoban evaluation set, or plot curves.")
    p.add_argument("--model", default="smollm2-135m", help="'tiny', 'smollm2-135m', an HF id, or a checkpoint folder")
    p.add_argument("--env", default="sokoban", help="environment name (envs.make_env); default sokoban (6x6, 1 box)")
    p.add_argument("--n", type=int, default=32, help="number of evaluation puzzles (first n of the fixed set)")
    p.add_argument("--split", nargs="+", default=["eval"], choices=["eval", "train"],
                   help="task sets to play: eval (held out; writes eval.json/.md) and/or train (the training "
                        "levels, same greedy code; writes eval_train.json/.md)")
    p.add_argument("--train-n", type=int, default=None,
                   help="training puzzles for --split train (first n of the training set; default: all of it)")
    p.add_argument("--max-turns", type=int, default=3, help="turns per episode (as train.py)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="token budget per model turn (as train.py)")
    p.add_argument("--reward", default="completion", choices=["completion", "shaped"],
                   help="Sokoban episode reward (as train.py); Acc and Comp do not depend on it")
    p.add_argument("--parse", default="lenient", choices=["strict", "lenient"],
                   help="Sokoban answer parsing (as in train.py): strict = only <action>..</action>; lenient = "
                        "also move words anywhere in the text")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--batch-size", type=int, default=16, help="puzzles played at once")
    p.add_argument("--out", default="eval_out", help="folder for eval.json and eval.md (or compare.md/.png)")
    p.add_argument("--plot", metavar="METRICS_JSONL", help="instead of evaluating, plot this metrics.jsonl to PNG")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="instead of evaluating, compare run folders (grouped by method; mean, std and min-max over "
                        "seeds; base-model folders as rows) into OUT/compare.md and OUT/compare.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.plot:
        print("wrote", plot(args.plot))
        return
    if args.compare:
        print(compare(args.compare, args.out), end="")
        return
    if args.n < 1 or (args.train_n is not None and args.train_n < 1):
        p.error("--n and --train-n must be >= 1")
    try:
        seeds = {s: envs.task_set(s, args.n if s == "eval" else args.train_n, env=args.env) for s in args.split}
        model, tok = M.load(args.model, device=args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    model.eval()
    for split in dict.fromkeys(args.split):
        with torch.no_grad(), M.autocast(args.device):
            results = evaluate(model, tok, args.env, seeds[split], args.max_new_tokens, env_overrides(args, split),
                               temperature=args.temperature, batch_size=args.batch_size, progress=True)
        summary = summarize(results)
        name = f"{args.model} ({args.parse} parsing{', training levels' if split == 'train' else ''})"
        write_report(args.out, name, results, summary, tag="eval" if split == "eval" else "eval_train")
        print(markdown_table([(f"{args.model} [{split}]", summary)]))


if __name__ == "__main__":
    main()
