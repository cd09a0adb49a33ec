"""A study: methods x seeds of train.py under one frozen configuration, the base model, one comparison table.

    python study.py --config docs/study/sokoban-paper.json --methods skill-sd grpo opd skill-aug-grpo \
        skill-sd-frozen --seeds 0 1 2 --out runs/study
    python study.py ... --nproc 8 -- --model Qwen/Qwen3-4B-Instruct-2507 --device cuda ...   # flags after -- go to
                                                                                               # every train.py run
Each run is `train.py` in a subprocess (`torchrun --standalone --nproc_per_node N` with --nproc N), then
`eval.py --split train` on its final checkpoint (the training levels, greedy, the same code as the held-out
evaluation train.py ends with). The base model is evaluated once on both sets, with the runs' own settings (read
from a run's args.json). At the end `eval.compare` writes OUT/compare.md and OUT/compare.png.

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
        f.write(f"$ {shlex.join(cmd)}\n")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- are passed to every train.py run (after the config's).")
    p.add_argument("--config", required=True, help="JSON object of train.py flags shared by every run (frozen)")
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
    out = os.path.abspath(a.out)
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
        print(E.compare(done, out), end="")
        print(f"wrote {out}/compare.md and compare.png ({len(done)} folders, study wall {fmt(time.time() - t_study)})")
    if failed:
        print(f"unfinished: {', '.join(failed)}; rerun the same command to finish them", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
