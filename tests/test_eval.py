"""eval.py: the report's arithmetic against hand computation, a solved episode's optimal-length ratio, plots."""
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


def test_cli_evaluates_training_levels_into_their_own_report(tmp_path):
    E.main(["--model", "tiny", "--device", "cpu", "--env", "sokoban-paper", "--split", "eval", "train", "--n", "2",
            "--train-n", "3", "--max-turns", "1", "--max-new-tokens", "2", "--out", str(tmp_path)])
    ev, tr = json.load(open(tmp_path / "eval.json")), json.load(open(tmp_path / "eval_train.json"))
    assert [r["task_id"] for r in ev["results"]] == envs.task_set("eval", 2, env="sokoban-paper")
    assert [r["task_id"] for r in tr["results"]] == envs.task_set("train", env="sokoban-paper")[:3]  # the easiest 3
    assert tr["summary"]["n"] == 3 and "training levels" in tr["model"] and (tmp_path / "eval_train.md").exists()
    with pytest.raises(SystemExit, match="1..96"):
        E.main(["--model", "tiny", "--env", "sokoban-paper", "--split", "train", "--train-n", "97", "--out", str(tmp_path)])
