"""study.py: config -> train.py flags, clear errors, torchrun commands, and end to end on the tiny model: a second
run of a finished study changes nothing, and a study killed mid-run resumes to the same table."""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import envs
import study as S
import train
import warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"_comment": "ignored", "model": "tiny", "device": "cpu", "env": "sokoban-paper", "steps": 3, "eval_every": 1,
        "eval_n": 2, "train_tasks": 4, "max_turns": 1, "max_new_tokens": 4, "prompts_per_step": 2, "group_size": 2,
        "micro_batch": 4, "lr": 1e-3}
TIMING = {"step_time", "rollout_time", "tokens_per_s", "peak_mem_gb"}


def config(tmp_path, cfg=TINY):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_config_flags_and_variants():
    cfg = {"steps": 3, "max-len": 5, "fsdp": True, "top_p": None, "x": False, "_note": "..", "lr": 1e-6}
    assert S.config_flags(cfg) == ["--steps", "3", "--max-len", "5", "--fsdp", "--lr", "1e-06"]
    assert S.config_flags({"a": [1, 2]}) == ["--a", "1", "2"]
    for bad in ({"method": "grpo"}, {"seed": 1}, {"save-every": 2}):
        with pytest.raises(ValueError, match="must not set"):
            S.config_flags(bad)
    with pytest.raises(ValueError, match="JSON object"):
        S.config_flags([1])
    assert S.variant("skill-sd-frozen") == ("skill-sd-frozen", ["--method", "skill-sd", "--teacher", "frozen"])
    assert S.variant("lam0.01=--method skill-sd --lam 0.01") == ("lam0.01", ["--method", "skill-sd", "--lam", "0.01"])
    for bad, msg in (("nope", "unknown method"), ("a/b=--lam 1", "bad method name"), ("base=--lam 1", "bad method")):
        with pytest.raises(ValueError, match=msg):
            S.variant(bad)


def test_dry_run_commands_parse_as_train_flags(tmp_path, capsys):
    cfg = config(tmp_path)
    assert S.main(["--config", cfg, "--methods", "grpo", "skill-sd-offpolicy", "--seeds", "0", "1", "--nproc", "2",
                   "--out", str(tmp_path / "s"), "--dry-run", "--", "--lr", "2e-3"]) == 0
    cmds = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert len(cmds) == 4 and not (tmp_path / "s").exists()
    for cmd in cmds:
        assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        args = train.parse_args(cmd[cmd.index("train.py") + 1:])  # every flag is one of train.py's
        assert (args.lr, args.steps, args.env, args.train_tasks) == (2e-3, 3, "sokoban-paper", 4)  # -- beats config
    last = train.parse_args(cmds[-1][cmds[-1].index("train.py") + 1:])
    assert (last.method, last.rollout_owner, last.seed, last.save_every) == ("skill-sd", "teacher", 1, 10)
    assert last.out == str(tmp_path / "s" / "skill-sd-offpolicy" / "seed-1")


def test_a_relative_out_stays_relative_in_every_command(tmp_path, capsys, monkeypatch):
    """Run from the project root (where the runs run), --out reaches train.py, warmup.py and the files they write
    as passed: committed run files then hold no machine paths (tests/test_readme.py checks docs/)."""
    monkeypatch.chdir(ROOT)
    cfg = config(tmp_path, {**TINY, "warmup": {"steps": 2}})
    assert S.main(["--config", cfg, "--methods", "grpo", "--out", "runs/s", "--dry-run"]) == 0
    warm, run = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert warm[warm.index("--out") + 1] == os.path.join("runs", "s", "warm-model")
    args = train.parse_args(run[run.index("train.py") + 1:])
    assert (args.out, args.model) == (os.path.join("runs", "s", "grpo", "seed-0"), os.path.join("runs", "s", "warm-model"))


def test_a_warmup_config_starts_every_run_from_the_warm_model(tmp_path, capsys):
    cfg = config(tmp_path, {**TINY, "warmup": {"steps": 2, "lr": 1e-3}})
    out = tmp_path / "s"
    assert S.main(["--config", cfg, "--methods", "grpo", "opd", "--out", str(out), "--dry-run"]) == 0
    cmds = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert len(cmds) == 3 and cmds[0][1] == "warmup.py"
    flags = cmds[0][2:]
    assert flags[flags.index("--model") + 1] == "tiny" and flags[flags.index("--env") + 1] == "sokoban-paper"
    assert flags[flags.index("--max-turns") + 1] == "1" and flags[flags.index("--steps") + 1] == "2"
    assert flags[flags.index("--out") + 1] == str(out / "warm-model")
    warmup.main(flags)  # the command is warmup.py's own: it runs and writes the model the runs will load
    assert (out / "warm-model" / "config.json").exists()
    for cmd in cmds[1:]:
        args = train.parse_args(cmd[cmd.index("train.py") + 1:])
        assert args.model == str(out / "warm-model") and cmd.count("--model") == 1


@pytest.mark.parametrize("argv, msg", [
    (["--config", "/nonexistent.json"], "cannot read --config"),
    (["--methods", "bogus"], "unknown method"),
    (["--nproc", "0"], "--nproc"),
    (["--", "--seed", "3"], "flags after -- must not set"),
])
def test_bad_input_is_a_one_line_error(tmp_path, argv, msg):
    base = ["--config", config(tmp_path), "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as e:
        S.main(base + argv)
    assert str(e.value.code).startswith("error:") and msg in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_study_refuses_another_configuration(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"config": {**TINY, "steps": 99}, "train_flags": []}))
    with pytest.raises(SystemExit, match="another configuration"):
        S.main(["--config", config(tmp_path), "--methods", "grpo", "--out", str(out)])
    assert not (out / "grpo").exists()


def test_paper_config():
    cfg = json.load(open(os.path.join(ROOT, "docs", "study", "sokoban-paper.json")))
    env = envs.make_env(cfg["env"], max_turns=cfg["max_turns"])
    assert env.max_turns * env.max_actions_per_turn == 40 and (env.dim, env.num_boxes) == ((6, 6), 2)
    assert cfg["train_tasks"] == len(envs.task_set("train", env=cfg["env"])) == 96
    assert cfg["eval_n"] == len(envs.task_set("eval", env=cfg["env"])) == 64
    for name, flags in S.VARIANTS.items():
        train.parse_args(S.config_flags(cfg) + flags)


def snapshot(root):
    """Every file under root except the comparison outputs -> (mtime, sha256)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if not f.startswith("compare."):
                out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def read_metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(run / "metrics.jsonl")]


def without_wall(table):  # wall time is the one column that differs between two runs of the same study
    return [row.rsplit("|", 2)[0] for row in table.splitlines()]


@pytest.mark.slow
def test_rerun_changes_nothing_and_a_killed_study_resumes_to_the_same_table(tmp_path, capsys):
    """~8 subprocesses on the tiny model (about 1-2 min on 2 idle cores)."""
    cfg = config(tmp_path)
    argv = lambda out: ["--config", cfg, "--methods", "grpo", "skill-sd-frozen", "--out", str(out), "--save-every", "1"]  # noqa: E731
    a = tmp_path / "A"
    assert S.main(argv(a)) == 0
    table = (a / "compare.md").read_text()
    assert [r.split("|")[1].strip() for r in table.split("\n\n")[0].splitlines()[2:]] == ["base model", "grpo", "skill-sd-frozen"]
    for run in (a / "grpo" / "seed-0", a / "skill-sd-frozen" / "seed-0"):
        info = json.load(open(run / "run.json"))
        assert info["done"] and info["wall_s"] > 0 and [x["rc"] for x in info["attempts"]] == [0]
        assert json.load(open(run / "eval_train.json"))["summary"]["n"] == 4
        assert [m["step"] for m in read_metrics(run) if "eval_acc" in m] == [1, 2, 3]
    assert json.load(open(a / "base" / "eval_train.json"))["summary"]["n"] == 4

    # a second run: no train.py or eval.py is started, no file changes, the same table
    before, png = snapshot(a), (a / "compare.png").read_bytes() if (a / "compare.png").exists() else None
    capsys.readouterr()
    assert S.main(argv(a)) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "pid" not in out
    assert snapshot(a) == before and (a / "compare.md").read_text() == table
    assert png is None or (a / "compare.png").read_bytes() == png  # rewritten, byte for byte the same

    # B: its first run finished earlier (a copy of A's: runs are deterministic), the second is killed mid-way
    b = tmp_path / "B"
    for sub in ("grpo", "base"):
        shutil.copytree(a / sub, b / sub)
    log = tmp_path / "b.log"
    proc = subprocess.Popen([sys.executable, "study.py", *argv(b)], cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    run = b / "skill-sd-frozen" / "seed-0"
    deadline = time.time() + 900
    while not (run / "latest").exists():  # the first checkpoint (step 1 of 3)
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.01)
    os.kill(int(re.findall(r"pid (\d+)", log.read_text())[-1]), signal.SIGKILL)
    assert proc.wait(timeout=900) == 1, log.read_text()
    info = json.load(open(run / "run.json"))
    assert [x["rc"] for x in info["attempts"]] == [-signal.SIGKILL] and not info.get("done")
    assert "unfinished: [2/2] skill-sd-frozen seed 0" in log.read_text()

    assert S.main(argv(b)) == 0  # resumes the killed run from its checkpoint
    info = json.load(open(run / "run.json"))
    assert [x["rc"] for x in info["attempts"]] == [-signal.SIGKILL, 0] and info["done"]
    assert "--resume" in open(run / "train.log").read().split("$ ")[-1].splitlines()[0]
    assert read_metrics(run) == read_metrics(a / "skill-sd-frozen" / "seed-0")
    assert without_wall((b / "compare.md").read_text()) == without_wall(table)


def _fake_run(d, name, seed, acc, comp, train=None, curve=(), wall=None, args=None, n=64):
    """A run folder with only the small text files the comparison reads."""
    os.makedirs(d)
    if name is not None:
        json.dump({"name": name, "seed": seed, **({"wall_s": wall} if wall is not None else {})}, open(d / "run.json", "w"))
    if args is not None:
        json.dump(args, open(d / "args.json", "w"))
    json.dump({"model": "m", "summary": {"n": n, "acc": acc, "comp": comp}}, open(d / "eval.json", "w"))
    if train is not None:
        json.dump({"model": "m", "summary": {"n": 96, "acc": train[0], "comp": train[1]}}, open(d / "eval_train.json", "w"))
    with open(d / "metrics.jsonl", "w") as f:
        for step, a in curve:
            f.write(json.dumps({"step": step, "reward": 0.1, "success": a / 100, "skills": {"hit_rate": 0.5}}) + "\n"
                    + json.dumps({"step": step, "eval_acc": a}) + "\n")


def test_compare_table_matches_numpy(tmp_path):
    np = pytest.importorskip("numpy")
    acc = {"grpo": [50.0, 56.25, 43.75], "skill-sd": [62.5, 60.9375]}
    comp = {"grpo": [60.0, 70.5, 65.0], "skill-sd": [71.0, 72.0]}
    dirs = [tmp_path / "base"]
    _fake_run(dirs[0], "base model", None, 12.5, 32.0, train=(10.0, 30.0))
    for m in acc:
        for s, (a, c) in enumerate(zip(acc[m], comp[m])):
            dirs.append(tmp_path / m / f"seed-{s}")
            _fake_run(dirs[-1], m, s, a, c, train=(a + 10, c + 5), curve=[(10, a / 2), (20, a)], wall=60.0 * (s + 1),
                      args={"method": "grpo"})  # run.json's name wins over args.json's method
    dirs.append(tmp_path / "plain")  # no run.json: named from its args.json; no training-level evaluation
    _fake_run(dirs[-1], None, None, 25.0, 40.0, args={"method": "skill-sd", "teacher": "frozen", "rollout_owner": "student"},
              curve=[(10, 20.0)])
    table = S.compare([str(d) for d in dirs[::-1]], str(tmp_path / "out"))
    assert (tmp_path / "out" / "compare.md").read_text() == table
    main, diag = table.split("\n\n", 1)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in main.splitlines()[2:]}
    assert list(rows) == ["base model", "skill-sd-frozen", "skill-sd", "grpo"]  # base first, then input order
    ref = lambda xs: f"{np.mean(xs):.1f} ± {np.std(xs, ddof=1):.1f} ({np.min(xs):.1f}-{np.max(xs):.1f})"  # noqa: E731
    for m in acc:
        walls = [60.0 * (s + 1) for s in range(len(acc[m]))]
        assert rows[m] == [str(len(acc[m])), "64", ref(acc[m]), ref(comp[m]), "96", ref(np.add(acc[m], 10)),
                           ref(np.add(comp[m], 5)), f"{np.mean(walls) / 60:.1f} min"]
    assert rows["base model"] == ["1", "64", "12.5", "32.0", "96", "10.0", "30.0", "-"]
    assert rows["skill-sd-frozen"] == ["1", "64", "25.0", "40.0", "-", "-", "-", "-"]
    # diagnostics: the mean over seeds of each run's mean over steps; columns never logged are '-'
    d = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in diag.splitlines()[4:]}
    assert list(d) == ["skill-sd-frozen", "skill-sd", "grpo"]  # no base row: it has no training
    head = [c.strip() for c in diag.splitlines()[2].split("|")[2:-1]]
    for m in acc:
        assert d[m][head.index("rollout success")] == f"{np.mean([(a / 2 + a) / 2 / 100 for a in acc[m]]):.3g}"
        assert d[m][head.index("skill hit rate")] == "0.5" and d[m][head.index("gap")] == "-"
    if importlib.util.find_spec("matplotlib"):
        png = tmp_path / "out" / "compare.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no eval.json"):
        S.compare([str(tmp_path)], str(tmp_path / "out"))
