"""warmup.py: the format warm-up's conversations are the chat template's own rendering, its loss falls on the
answers only and never on a solution, and a short run writes a model that loads."""
import random

import envs
import model as M
import warmup as W
from rollout import _render


def test_conversation_is_the_template_rendering_with_loss_on_answers_only():
    _, tok = M.load("tiny")
    env = envs.make_env("sokoban", max_turns=3)
    for seed in range(3_000_000, 3_000_006):
        ids, mask = W.conversation(tok, env, seed, W.random_answers(env, 3, random.Random(seed)))
        assert len(ids) == len(mask)
        answers, cur = [], []  # the masked runs of tokens
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                answers.append(cur)
                cur = []
        answers += [cur] if cur else []
        assert 1 <= len(answers) <= 3 and all(a[-1] == tok.eos_token_id for a in answers)
        texts = [tok.decode(a[:-1]) for a in answers]
        for t in texts:  # the format, with 1 to 3 random moves and nothing else
            assert t.startswith("<action>") and t.endswith("</action>")
            assert 1 <= len(envs.parse_actions(t)) <= 3
        # replay the same answers: the ids are the template's rendering of that conversation
        env2 = envs.make_env("sokoban", max_turns=3)
        msgs = [{"role": "system", "content": env2.task_prompt()}, {"role": "user", "content": env2.reset(seed)}]
        for i, t in enumerate(texts):
            obs, _, done, _ = env2.step(t)
            msgs.append({"role": "assistant", "content": t})
            if i + 1 < len(texts):
                assert not done
                msgs.append({"role": "user", "content": obs})
        assert _render(tok, msgs, False).startswith(tok.decode(ids))
        assert tok.decode(ids).endswith(tok.eos_token)


def test_random_moves_are_not_solutions_on_average():
    """The warm-up must not teach solutions: its answers are uniform over the four moves whatever the level."""
    _, tok = M.load("tiny")
    env = envs.make_env("sokoban", max_turns=1)
    counts = dict.fromkeys(envs.ACTION_NAMES, 0)
    rng = random.Random(0)
    for seed in range(3_000_000, 3_000_200):
        ids, mask = W.conversation(tok, env, seed, W.random_answers(env, 1, rng))
        for a in envs.parse_actions(tok.decode([t for t, m in zip(ids, mask) if m][:-1])):
            counts[a] += 1
    total = sum(counts.values())
    assert all(abs(c / total - 0.25) < 0.05 for c in counts.values()), counts


def test_warmup_writes_a_loadable_model(tmp_path, capsys):
    out = str(tmp_path / "warm")
    W.main(["--model", "tiny", "--steps", "2", "--batch", "2", "--lr", "1e-3", "--out", out])
    losses = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("step ")]
    assert len(losses) == 2
    m, _ = M.load(out)
    m0, _ = M.load("tiny")
    assert any((p - q).abs().max() > 1e-6 for p, q in zip(m.parameters(), m0.parameters()))
