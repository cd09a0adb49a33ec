"""A study: methods x seeds of train.py under one frozen configuration, the base model, one comparison table.

    python study.py --config docs/study/sokoban-paper.json --methods skill-sd grpo opd skill-aug-grpo \
        skill-sd-frozen --seeds 0 1 2 --out runs/study
    python study.py ... --nproc 8 -- --model Qwen/Qwen3-4B-Instruct-2507 --device cuda ...   # flags after -- go to
                                                                                               # every train.py run
Each run is `train.py` in a subprocess (`torchrun --standalone --nproc_per_node N` with --nproc N), then
`eval.py --split train` on its final checkpoint (the training levels, greedy, the same code as the held-out
evaluation train.py ends with). The base model is evaluated once on both sets, with the runs' own settings (read
from a run's args.json). At the end `compare` writes OUT/compare.md and OUT/compare.png.

Layout of --out: study.json (the frozen configuration: the config file's flags and the flags after --),
base/ (eval.json, eval_train.json, run.json), NAME/seed-S/ (a train.py --out folder plus eval_train.json, run.json:
name, flags, wall time of every attempt, done; train.log and eval.log: the subprocesses' output), and warm-model/
when the config holds "warmup": {warmup.py flags}: a format warm-up run once, the model every run and the base row
start from (its --model, --env and --max-turns are the config's).

Rerunning the same command is safe: a finished run (run.json says done) is skipped, an unfinished one resumes from
its latest checkpoint (--save-every bounds the loss) or restarts clean when it has none, and the comparison is
rewritten from the run folders alone. A failed run is reported and the others go on; the exit status is 1.

Deliberate simplifications: runs go one after another (each may use every GPU through --nproc); a run's wall
time is the sum over its train.py attempts (a resumed run counts its lost work too), without the train-levels
evaluation, which run.json records separately; a run killed together with study.py loses its attempt's time.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

import eval as E

ROOT = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name -> train.py flags; the paper's rows (PAPER.md section 4)
    "skill-sd": ["--method", "skill-sd"],
    "grpo": ["--method", "grpo"],
    "opd": ["--method", "opd"],
    "skill-aug-grpo": ["--method", "skill-aug-grpo"],
    "skill-sd-frozen": ["--method", "skill-sd", "--teacher", "frozen"],
    "skill-sd-offpolicy": ["--method", "skill-sd", "--rollout-owner", "teacher"],
    "skill-sd-offpolicy-frozen": ["--method", "skill-sd", "--rollout-owner", "teacher", "--teacher", "frozen"],
}
RESERVED = ("method", "teacher", "rollout_owner", "seed", "out", "resume", "save_every")  # set by the study


def config_flags(cfg):
    """{train.py flag: value} -> argv. Keys with - or _; '_comment'-like keys are ignored; true -> a bare flag,
    false / null -> left out, a list -> several values."""
    if not isinstance(cfg, dict):
        raise ValueError("the config must be a JSON object of train.py flags, like {\"steps\": 180}")
    argv = []
    for k, v in cfg.items():
        if k.startswith("_") or v is None or v is False:
            continue
        if k.replace("-", "_") in RESERVED:
            raise ValueError(f"the config must not set {k!r}: the study sets {', '.join(RESERVED)}")
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, *map(str, v)] if isinstance(v, list) else [flag, str(v)]
    return argv


def variant(spec):
    """'grpo' (a known variant) or 'NAME=TRAIN FLAGS' (e.g. 'lam0.01=--method skill-sd --lam 0.01')."""
    name, _, flags = spec.partition("=")
    if not re.fullmatch(r"[\w.+-]+", name) or name == "base":
        raise ValueError(f"bad method name {name!r}: letters, digits, . _ + - only, and not 'base'")
    if not flags and name not in VARIANTS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(VARIANTS)}, or NAME='TRAIN.PY FLAGS'")
    return name, shlex.split(flags) if flags else VARIANTS[name]


def read_json(path):
    return json.load(open(path)) if os.path.exists(path) else None


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def attempt(cmd, log, info, key):
    """Run cmd with its output appended to `log`; add its wall time and exit status to info[key]."""
    t0, started = time.time(), datetime.datetime.now().isoformat(timespec="seconds")
    with open(log, "a") as f:
        f.write(f"$ {shlex.join([os.path.basename(cmd[0]), *cmd[1:]])}\n")  # python, not this machine's path to it
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        print(f"    pid {proc.pid}, log {log}", flush=True)
        rc = proc.wait()
    info.setdefault(key, []).append({"started": started, "wall_s": round(time.time() - t0, 2), "rc": rc})
    return rc


def eval_cmd(args, model, splits, out):
    """eval.py with a finished run's own settings (its args.json), so every number comes from the same code."""
    return [sys.executable, "eval.py", "--model", model, "--env", args["env"], "--split", *splits,
            "--n", str(args["eval_n"]), *(["--train-n", str(args["train_tasks"])] if args.get("train_tasks") else []),
            "--max-turns", str(args["max_turns"]), "--max-new-tokens", str(args["max_new_tokens"]),
            "--parse", args["parse"], "--device", args["device"], "--out", out]


def fmt(s):
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


# ------------------------------------------------------------------------------------------------------------
# the comparison: reads only each run folder's small text files, so committed copies of them reproduce it

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
    metrics = E.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    curve = [(m["step"], m["eval_acc"]) for m in metrics if m.get("eval_acc") is not None]
    return {"name": run.get("name") or (label if args else ev["model"]), "eval": ev["summary"],
            "train": tr and tr["summary"], "curve": curve, "wall_s": run.get("wall_s"), "base": not args,
            "diag": {k: step_mean(metrics, k) for k in DIAGNOSTICS}}


# training diagnostics compared per method: metrics.jsonl key (a.b = key b of dict a) -> column title
DIAGNOSTICS = {"success": "rollout success", "frac_zero_var": "zero-variance groups", "entropy": "entropy",
               "distill_frac": "distilled episodes", "gap": "gap", "teacher_adv_corr": "teacher-adv. corr",
               "teacher_adv_corr_episode_mean": "old per-episode corr", "grad_norm": "grad norm (pre-clip)",
               "grad_norm_grpo": "GRPO grad norm", "grad_norm_sdl": "SDL grad norm", "skills.hit_rate": "skill hit rate",
               "step_time": "s / step"}


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
        plt = E.pyplot()
    except ImportError as e:  # matplotlib is in requirements.txt; the table above is written either way
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
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- are passed to every train.py run (after the config's).")
    p.add_argument("--config", help="JSON object of train.py flags shared by every run (frozen); required unless "
                                    "--compare")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR",
                   help="only compare finished run folders (grouped by method; mean, std and min-max over seeds; "
                        "base-model folders as rows) into OUT/compare.md and OUT/compare.png")
    p.add_argument("--methods", nargs="+", default=["skill-sd", "grpo", "opd", "skill-aug-grpo", "skill-sd-frozen"],
                   help=f"variants: {', '.join(VARIANTS)}, or NAME='TRAIN.PY FLAGS' (default: the paper's rows)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.py --seed of each run of each method")
    p.add_argument("--out", default="runs/study", help="study folder (see the module docstring)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (> 1: torchrun, e.g. 8 for 8 GPUs)")
    p.add_argument("--save-every", type=int, default=10,
                   help="train.py --save-every: checkpoint every N steps, so a killed run loses at most N steps")
    p.add_argument("--prune", action="store_true",
                   help="delete a run's checkpoints once it is evaluated (a 4B model's weights + optimizer state "
                        "take ~50 GB per run); the comparison needs only the small text files")
    p.add_argument("--dry-run", action="store_true", help="print the train.py commands and exit")
    a = p.parse_args(argv)
    if a.compare:
        print(compare(a.compare, a.out), end="")
        return 0
    if not a.config:
        p.error("--config is required (or --compare RUN_DIR ...)")
    try:
        if a.nproc < 1 or a.save_every < 1:
            raise ValueError("--nproc and --save-every must be >= 1")
        try:
            cfg = json.load(open(a.config))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --config {a.config}: {e}")
        warm = cfg.get("warmup")  # warmup.py flags: every run (and the base row) starts from its model
        if warm is not None and not isinstance(warm, dict):
            raise ValueError("the config's warmup must be a JSON object of warmup.py flags, like {\"steps\": 12}")
        flags = config_flags({k: v for k, v in cfg.items() if k != "warmup" and (k != "model" or warm is None)})
        if warm is not None:
            warm_flags = config_flags({**warm, "model": cfg.get("model"), "env": cfg.get("env"),
                                       "max_turns": cfg.get("max_turns", cfg.get("max-turns"))})
        if [f for f in extra if f.lstrip("-").split("=")[0].replace("-", "_") in RESERVED]:
            raise ValueError(f"flags after -- must not set {', '.join(RESERVED)}: the study sets them")
        if cfg.get("eval_n", cfg.get("eval-n", 1)) < 1:
            raise ValueError("the study compares final evaluations: eval_n must be >= 1")
        methods = dict(variant(m) for m in a.methods)
    except ValueError as e:
        sys.exit(f"error: {e}")
    out = a.out if os.path.samefile(os.getcwd(), ROOT) else os.path.abspath(a.out)  # runs run in ROOT: as passed there
    frozen = {"config": cfg, "train_flags": extra}
    if warm is not None:
        warm_dir = os.path.join(out, "warm-model")
        warm_cmd = [sys.executable, "warmup.py", *warm_flags, "--out", warm_dir]
        flags += ["--model", warm_dir]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
                                 if a.nproc > 1 else []) + ["train.py"]
    runs = [(name, s, os.path.join(out, name, f"seed-{s}"), flags + extra + vflags + ["--seed", str(s)])
            for name, vflags in methods.items() for s in a.seeds]
    if a.dry_run:
        if warm is not None:
            print(shlex.join(warm_cmd))
        for _, _, d, fl in runs:
            print(shlex.join(launch + fl + ["--out", d, "--save-every", str(a.save_every)]))
        return 0
    old = read_json(os.path.join(out, "study.json"))
    if old is not None and old != frozen:
        sys.exit(f"error: {out} was made with another configuration (its study.json); use a new --out, or the "
                 f"same config and flags after --")
    for name, s, d, fl in runs:
        made = (read_json(os.path.join(d, "run.json")) or {}).get("flags")
        if made is not None and made != fl:
            sys.exit(f"error: {d} was made with other flags ({shlex.join(made)}); use a new --out")
    os.makedirs(out, exist_ok=True)
    if old is None:
        write_json(os.path.join(out, "study.json"), frozen)

    failed, t_study = [], time.time()
    if warm is not None:  # the format warm-up, once: the base model of every row
        info = read_json(os.path.join(warm_dir, "run.json")) or {"name": "format warm-up"}
        if not info.get("done"):
            print(f"format warm-up -> {warm_dir}", flush=True)
            os.makedirs(warm_dir, exist_ok=True)
            info["done"] = attempt(warm_cmd, os.path.join(out, "warmup.log"), info, "attempts") == 0
            write_json(os.path.join(warm_dir, "run.json"), info)
            if not info["done"]:
                sys.exit(f"error: warmup.py failed; see {out}/warmup.log")
    for i, (name, s, d, fl) in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {name} seed {s}"
        info = read_json(os.path.join(d, "run.json")) or {"name": name, "seed": s, "flags": fl}
        if info.get("done"):
            print(f"{tag}: finished earlier ({fmt(info['wall_s'])}), skipped", flush=True)
            continue
        latest = os.path.join(d, "latest")
        if not os.path.exists(latest) and os.path.isdir(d):  # no checkpoint: start clean (train.py appends logs)
            for f in os.listdir(d):
                if f not in ("run.json", "train.log"):
                    shutil.rmtree(os.path.join(d, f)) if os.path.isdir(os.path.join(d, f)) else os.remove(os.path.join(d, f))
        os.makedirs(d, exist_ok=True)
        resume = os.path.exists(latest)
        print(f"{tag}: {'resuming from ' + open(latest).read().strip() if resume else 'training'} -> {d}", flush=True)
        rc = attempt(launch + fl + ["--out", d, "--save-every", str(a.save_every)] + (["--resume"] if resume else []),
                     os.path.join(d, "train.log"), info, "attempts")
        info["wall_s"] = round(sum(x["wall_s"] for x in info["attempts"]), 2)
        write_json(os.path.join(d, "run.json"), info)
        if rc != 0:
            print(f"{tag}: train.py failed (exit status {rc}); see {d}/train.log; rerun to resume", flush=True)
            failed.append(tag)
            continue
        args = read_json(os.path.join(d, "args.json"))
        ckpt = os.path.join(d, open(latest).read().strip())
        print(f"{tag}: trained in {fmt(info['wall_s'])}; evaluating {os.path.basename(ckpt)} on the training levels",
              flush=True)
        if attempt(eval_cmd(args, ckpt, ["train"], d), os.path.join(d, "eval.log"), info, "eval_train") != 0:
            print(f"{tag}: eval.py failed; see {d}/eval.log", flush=True)
            failed.append(tag)
        else:
            info["done"] = True
            if a.prune:
                for f in os.listdir(d):
                    if f.startswith("ckpt-"):
                        shutil.rmtree(os.path.join(d, f))
        write_json(os.path.join(d, "run.json"), info)

    # the base model, once, with the settings of any run that started (all share them but method and seed)
    base = os.path.join(out, "base")
    args = next((read_json(os.path.join(d, "args.json")) for _, _, d, _ in runs
                 if os.path.exists(os.path.join(d, "args.json"))), None)
    info = read_json(os.path.join(base, "run.json")) or {"name": "base model"}
    if args and not info.get("done"):
        os.makedirs(base, exist_ok=True)
        cmd = eval_cmd(args, args["model"], ["eval", "train"], base)
        print(f"base model {args['model']}: evaluating on the held-out and the training levels", flush=True)
        info["done"] = attempt(cmd, os.path.join(base, "eval.log"), info, "eval") == 0
        if not info["done"]:
            failed.append("base model")
        write_json(os.path.join(base, "run.json"), info)

    done = [d for _, _, d, _ in runs if (read_json(os.path.join(d, "run.json")) or {}).get("done")]
    done = ([base] if info.get("done") else []) + done
    if done:
        print(compare(done, out), end="")
        print(f"wrote {out}/compare.md and compare.png ({len(done)} folders, study wall {fmt(time.time() - t_study)})")
    if failed:
        print(f"unfinished: {', '.join(failed)}; rerun the same command to finish them", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
