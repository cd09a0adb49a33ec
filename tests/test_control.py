"""The positive control's pieces (issue 22): privileged (oracle) skills, the skill-reading warm-up and probe, the
turn-centred teacher-advantage correlation, and --grad-norms. References: the Sokoban env replaying moves, the
solver, a KV-cache forward token by token, and the plain training step."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch

import envs
import model as M
import probe as PR
import rollout as R
import skills as S
import train
import warmup as W
from test_train import TINY, read_jsonl, weights

MOVE = {n.lower(): n for n in envs.ACTION_NAMES}


def workflow_moves(text):
    """The move names in a workflow text, in order (its only move words are the solution's)."""
    return [MOVE[w.lower()] for w in re.findall(r"\b(up|down|left|right)\b", text, flags=re.I)]


def replay_solves(seed, moves, **kw):
    env = envs.make_env("sokoban", max_turns=100, max_actions_per_turn=100, **kw)
    env.reset(seed)
    env.step(" || ".join(moves))
    return env.success


def test_oracle_workflow_is_the_solvers_solution_in_turns_and_the_rest_is_the_rule_summary():
    env = envs.make_env("sokoban", max_turns=3)
    for seed in range(5):
        env.reset(seed)
        sol = envs.solve(env.room_fixed, env.room_state)
        group = []
        for k in range(3):  # three short random games, the group the analyses are written from
            env.reset(seed)
            rng = random.Random(k)
            env.step(" || ".join(rng.choice(envs.ACTION_NAMES) for _ in range(3)))
            group.append({"task_id": seed, "env": "sokoban", "task": "", "turns": [], "reward": float(env.success),
                          "success": env.success, "facts": envs.sokoban_facts(env.history),
                          "solution": sol, "moves_per_turn": 3})
        oracle, rule = S.summarize([group], backend="oracle")[0], S.summarize([group], backend="rule")[0]
        assert (oracle.success_analysis, oracle.mistake_analysis, oracle.general) == \
            (rule.success_analysis, rule.mistake_analysis, rule.general)
        assert oracle.backend == "oracle" and workflow_moves(oracle.golden_workflow) == sol
        assert replay_solves(seed, workflow_moves(oracle.golden_workflow))
        turns = oracle.golden_workflow.split("turn ")[1:]
        assert len(turns) == -(-len(sol) // 3) and all(len(workflow_moves(t)) <= 3 for t in turns)
    stats = {}  # without a solution the oracle writes nothing (and says so), never a rule workflow
    assert S.summarize([[{k: v for k, v in group[0].items() if k != "solution"}]], "oracle", stats=stats) == []
    assert stats["dropped"] == 1


def test_a_short_oracle_run_writes_skills_whose_workflow_solves_their_level(tmp_path):
    out = str(tmp_path)
    train.main(TINY + ["--steps", "2", "--summarizer", "oracle", "--out", out])
    bank = json.load(open(os.path.join(out, "skills.json")))
    own = [s for s in bank["skills"] if s["scope"] == "task"]
    assert own and all(s["backend"] == "oracle" for s in own)
    for s in own:
        assert replay_solves(int(s["task_id"]), workflow_moves(s["golden_workflow"]))
    assert all(not S._MOVE_LIST.search(" ".join(s["general"])) for s in bank["skills"])  # pool: no move lists


def test_oracle_needs_a_sokoban_env():
    with pytest.raises(ValueError, match="Sokoban"):
        train.oracle_solutions(lambda: object(), [0])


def test_skill_reading_conversations_show_the_teachers_prompt_and_follow_the_workflow():
    _, tok = M.load("tiny")
    env = envs.make_env("sokoban", max_turns=3)
    skill, sol = W.oracle_skill(env, 4_000_000, random.Random(0))
    n = env.max_actions_per_turn
    answers = [W.answer(sol[i:i + n]) for i in range(0, len(sol), n)]
    ids, mask = W.conversation(tok, env, 4_000_000, answers, S.teacher_prompt(skill, env.task_prompt()))
    text = tok.decode(ids)
    assert S.teacher_prompt(skill, env.task_prompt()) in text and env.success  # the answers solved the level
    said = tok.decode([t for t, m in zip(ids, mask) if m])
    assert workflow_moves(said) == sol == workflow_moves(skill.golden_workflow)


def test_warmup_with_skill_batch_runs(tmp_path, capsys):
    W.main(["--model", "tiny", "--steps", "1", "--batch", "1", "--skill-batch", "2", "--out", str(tmp_path / "w")])
    assert "over" in capsys.readouterr().out and M.load(str(tmp_path / "w"))[0] is not None


def test_probe_scores_match_transformers(tmp_path):
    """The probe's log-prob of the answer under the teacher's prompt, against transformers' own Llama reading the
    same weights (an independent forward), and its top move against scoring the four '<action>M' strings."""
    from transformers import AutoModelForCausalLM
    model, tok = M.load("tiny")
    M.save(model, tok, str(tmp_path / "hf"))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    env = envs.make_env("sokoban", max_turns=3)
    seeds = envs.task_set("train", 3)
    rows = PR.probe(model, tok, env, seeds)
    skill, sol = W.oracle_skill(env, seeds[0], random.Random(0))  # the probe's first skill (same rng stream)
    assert rows[0]["solution"] == sol

    def logp(prompt, cont):  # transformers' log-prob of `cont` after `prompt`
        idx = torch.tensor([prompt + cont])
        with torch.no_grad():
            lp = torch.log_softmax(ref(idx).logits[0, :-1].double(), -1)
        return lp[len(prompt) - 1:].gather(1, idx[0, len(prompt):, None]).sum().item()

    prompt = R.prompt_ids(tok, S.teacher_prompt(skill, env.task_prompt()), env.reset(seeds[0]))
    ans = R._encode(tok, W.answer(sol[:3])) + [tok.eos_token_id]
    assert rows[0]["logp"]["own skill"] == pytest.approx(logp(prompt, ans), abs=1e-3)
    toks = rows[0]["tokens"]["own skill"]  # --tokens: per answer token, in order, summing to the total
    assert [t for t, _, _ in toks] == [tok.decode([i]) for i in ans]
    assert toks[0][1] == pytest.approx(logp(prompt, ans[:1]), abs=2e-3)
    assert sum(v for _, v, _ in toks) == pytest.approx(rows[0]["logp"]["own skill"], abs=1e-2)
    plain = R.prompt_ids(tok, env.task_prompt(), env.reset(seeds[0]))
    head = R._encode(tok, "<action>")
    best = max(envs.ACTION_NAMES, key=lambda m: logp(plain, R._encode(tok, "<action>" + m)[:len(head) + 1]))
    assert rows[0]["top"]["plain"] == best
    s = PR.report(rows)
    assert s["levels"] == 3 and 0 <= s["own_beats_other"] <= 3
    listed = PR.as_move_list(skill, sol)  # the same moves as a comma list: same moves, no answer format
    assert workflow_moves(listed.golden_workflow) == sol and "<action>" not in listed.golden_workflow
    assert PR.probe(model, tok, env, seeds, form="list")[0]["logp"]["plain"] == pytest.approx(rows[0]["logp"]["plain"])
    assert s["top_move_agrees"]["plain"] == sum(r["top"]["plain"] == r["solution"][0] for r in rows)


def test_turn_centred_gap_ignores_where_an_episode_ends():
    """The link that made teacher_adv_corr negative: a gap whose LEVEL differs by turn (the default run's
    +0.004, -0.052, -0.010) and solved episodes that end at turn 2 while failed ones play 3 turns. A teacher
    that judges nothing gets a per-episode-mean correlation of -1; the turn-centred one sees no signal (None), and
    a teacher that really favours the solved episodes' tokens gets +1."""
    offsets, G = [0.004, -0.052, -0.010], 4
    solved = [True, False, True, False]
    rewards = torch.tensor([[float(s) for s in solved]])
    adv = ((rewards - rewards.mean()) / rewards.std()).view(-1).tolist()
    gap = {i: [[offsets[k]] * 5 for k in range(2 if solved[i] else 3)] for i in range(G)}
    plain = [float(np.mean(sum(gap[i], []))) for i in range(G)]
    assert train.pearson(adv, plain) == pytest.approx(-1.0)  # the old statistic: pure artefact
    assert train.arm_rewards(rewards, adv, gap, False) == [None]  # centred turn by turn: nothing to see
    better = {i: [[g + 0.01 * solved[i] for g in t] for t in gap[i]] for i in range(G)}
    assert train.arm_rewards(rewards, adv, better, False)[0] == pytest.approx(1.0)


def test_grad_norms_leave_the_update_unchanged(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    flags = ["--steps", "2", "--lam", "0.5", "--lr", "1e-3"]
    train.main(TINY + flags + ["--out", a])
    train.main(TINY + flags + ["--grad-norms", "--out", b])
    for (k, x), y in zip(weights(os.path.join(a, "ckpt-000002")).items(),
                         weights(os.path.join(b, "ckpt-000002")).values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=k)
    ma, mb = read_jsonl(os.path.join(a, "metrics.jsonl")), read_jsonl(os.path.join(b, "metrics.jsonl"))
    for x, y in zip(ma, mb):
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4, abs=1e-7)
        assert y["grad_norm_grpo"] >= 0 and y["grad_norm_sdl"] >= 0
    assert any(y["grad_norm_sdl"] > 0 for y in mb)


def test_teacher_adv_corr_is_computed_on_groups_with_reward_spread(tmp_path, monkeypatch):
    """A reward that varies with the sampled text gives the tiny model's groups unequal rewards, so the correlation
    path of step_metrics runs end to end (the artefact test above exercises arm_rewards alone)."""
    class Spread(envs.Sokoban):
        def step(self, text):
            obs, _, done, info = super().step(text)
            return obs, float(len(text) % 3), done, info
    make = envs.make_env
    monkeypatch.setattr(envs, "make_env", lambda name, **kw: Spread(**{k: v for k, v in kw.items() if k != "parse"})
                        if name == "sokoban" else make(name, **kw))
    out = str(tmp_path)
    train.main(TINY + ["--steps", "3", "--group-size", "4", "--out", out, "--eval-n", "0"])
    ms = read_jsonl(os.path.join(out, "metrics.jsonl"))
    done = [m for m in ms if m["teacher_adv_corr"] is not None]
    assert done and all(-1 <= m["teacher_adv_corr"] <= 1 and -1 <= m["teacher_adv_corr_episode_mean"] <= 1
                        for m in done)
    assert all(m["gap_turn1"] is not None for m in done)
