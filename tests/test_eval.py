"""eval.py: the report's arithmetic against hand computation, a solved episode's optimal-length ratio, plots."""
import importlib.util
import json
import os

import pytest

import envs
import eval as E
import model as M
import rollout as R


def test_summarize_matches_hand_computation():
    results = [{"success": True, "completion": 1.0, "reward": 1.0, "turns": 2, "invalid_turns": 0, "moves": 6,
                "optimal_moves": 3},
               {"success": False, "completion": 0.5, "reward": 0.5, "turns": 5, "invalid_turns": 3, "moves": 2},
               {"success": True, "completion": 1.0, "reward": 1.0, "turns": 1, "invalid_turns": 1, "moves": 4,
                "optimal_moves": 4},
               {"success": False, "completion": 0.0, "reward": 0.0, "turns": 4, "invalid_turns": 4, "moves": 0}]
    s = E.summarize(results)
    assert s["n"] == 4 and s["acc"] == 50.0 and s["comp"] == 62.5
    assert s["mean_turns"] == 3.0 and s["invalid_rate"] == 8 / 12
    assert s["opt_ratio"] == (6 / 3 + 4 / 4) / 2
    table = E.markdown_table([("m", s)])
    assert "| m | 4 | 50.0 | 62.5 | 3.00 | 0.667 | 1.50 |" in table


def play(seed, plan):
    """Play a fixed move list, 3 moves per turn, as an Episode record."""
    env = envs.make_env("sokoban", max_turns=5)
    env.reset(seed)
    ep = R.Episode(tokens=[], mask=[], logprobs=[], prompt_len=0, task_id=seed)
    for i in range(0, len(plan), 3):
        text = "<action>" + " || ".join(plan[i:i + 3]) + "</action>"
        _, reward, done, info = env.step(text)
        ep.responses.append(text)
        ep.reward += reward
        if done:
            break
    ep.success, ep.completion, ep.history = info["success"], info["completion"], env.history
    return ep


def test_solved_episode_reports_its_optimal_length():
    """Replay the solver's answer after a 2-move detour that really moves (and comes back): the report must see
    len(best) + 2 moves against an optimum of len(best)."""
    make = lambda: envs.make_env("sokoban", max_turns=5)  # noqa: E731
    for seed in envs.task_set("eval", 10):
        env = make()
        env.reset(seed)
        best = envs.solve(env.room_fixed, env.room_state, max_depth=100)
        for detour in (["Left", "Right"], ["Right", "Left"], ["Up", "Down"], ["Down", "Up"]):
            res = E.episode_result(play(seed, detour + best), make)
            if res["success"] and res["moves"] == len(best) + 2:
                assert res["optimal_moves"] == len(best) and res["invalid_turns"] == 0
                assert E.summarize([res])["opt_ratio"] == (len(best) + 2) / len(best)
                return
    pytest.fail("no level of the first 10 allowed a free 2-move detour")


def test_evaluate_tiny_end_to_end(tmp_path):
    model, tok = M.load("tiny")
    seeds = envs.task_set("eval", 3)
    results = E.evaluate(model, tok, "sokoban", seeds, 4, {"max_turns": 2, "parse": "strict"}, batch_size=2)
    assert [r["task_id"] for r in results] == seeds and all(r["turns"] >= 1 for r in results)
    summary = E.summarize(results)
    E.write_report(str(tmp_path), "tiny", results, summary)
    saved = json.load(open(tmp_path / "eval.json"))
    assert saved["summary"] == summary and (tmp_path / "eval.md").read_text().startswith("| model |")


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "reward": i / 10, "loss_sdl": 0.1 / i}) + "\n" for i in range(1, 6)))
    out = E.plot(str(path))
    assert os.path.getsize(out) > 1000 and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        E.plot(str(tmp_path / "missing.jsonl"))


def test_cli_bad_model_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        E.main(["--model", str(tmp_path / "nope"), "--n", "1", "--out", str(tmp_path)])
    assert "error" in str(e.value.code)


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
    table = E.compare([str(d) for d in dirs[::-1]], str(tmp_path / "out"))
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
        E.compare([str(tmp_path)], str(tmp_path / "out"))


def test_cli_evaluates_training_levels_into_their_own_report(tmp_path):
    E.main(["--model", "tiny", "--device", "cpu", "--env", "sokoban-paper", "--split", "eval", "train", "--n", "2",
            "--train-n", "3", "--max-turns", "1", "--max-new-tokens", "2", "--out", str(tmp_path)])
    ev, tr = json.load(open(tmp_path / "eval.json")), json.load(open(tmp_path / "eval_train.json"))
    assert [r["task_id"] for r in ev["results"]] == envs.task_set("eval", 2, env="sokoban-paper")
    assert [r["task_id"] for r in tr["results"]] == envs.task_set("train", env="sokoban-paper")[:3]  # the easiest 3
    assert tr["summary"]["n"] == 3 and "training levels" in tr["model"] and (tmp_path / "eval_train.md").exists()
    with pytest.raises(SystemExit, match="1..96"):
        E.main(["--model", "tiny", "--env", "sokoban-paper", "--split", "train", "--train-n", "97", "--out", str(tmp_path)])
