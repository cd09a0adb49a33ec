"""Does a model read skills? A one-minute pre-flight check before spending GPU hours on Skill-SD.

    python probe.py --model smollm2-135m             # the base model, 24 training levels of `sokoban`
    python probe.py --model runs/warm-skills --out runs/warm-skills/probe.json

For N fixed training levels it scores the level's correct first answer in the exact answer format, the first
turn of the solver's shortest solution (`<action>m1 || m2 || m3</action>` + end of turn), under three prompts:
  (a) plain:       the student's prompt (the task rules and the map);
  (b) own skill:   the teacher's prompt (skills.teacher_prompt) holding this level's PRIVILEGED skill, written as
                   `train.py --summarizer oracle` writes it (warmup.oracle_skill: the solution is its workflow);
  (c) other skill: the teacher's prompt holding the next level's skill, of the same form.
It prints the mean log-prob of that answer under each, how often (b) beats (c) level by level, and how often each
prompt's most likely first move (the argmax over the first tokens of Up/Down/Left/Right right after "<action>";
each move is one token for SmolLM2 and Qwen) is the solution's.
A model that reads skills puts (b) well above (a) and (c) and agrees with the solution far more often under (b).
If it does not, the teacher of Skill-SD has nothing to pass on, whatever the loss does.

Deliberate simplifications: Sokoban envs only; one forward per (level, prompt), no cache; the first move is
read from the first token after "<action>" (the probe stops if two moves share it).
"""
import argparse
import dataclasses
import json
import random
import sys

import torch

import envs
import skills
from model import load as load_model
from rollout import _encode, prompt_ids
from warmup import answer, oracle_skill

CONDITIONS = ("plain", "own skill", "other skill")


def as_move_list(skill, sol):
    """The same skill with its workflow written as the rule summariser writes a solved level's (a comma list)."""
    return dataclasses.replace(skill, golden_workflow=f"Move sequence that solves this level ({len(sol)} moves): "
                               f"{', '.join(sol)}. Send these moves in order, a few per turn, in the required format.")


def probe(model, tok, env, seeds, form="answer"):
    """-> per level: {seed, solution, logp: {condition: float}, top: {condition: move}}. form: how the privileged
    workflow is written, "answer" (as --summarizer oracle: the answer format, turn by turn) or "list"."""
    rng = random.Random(0)
    n = env.max_actions_per_turn
    levels = [(s, *oracle_skill(env, s, rng)) for s in seeds]  # (seed, skill, solution)
    if form == "list":
        levels = [(s, as_move_list(k, sol), sol) for s, k, sol in levels]
    head = _encode(tok, "<action>")
    move_ids = [_encode(tok, "<action>" + m)[len(head):][:1] for m in envs.ACTION_NAMES]  # each move's first token
    if len({tuple(t) for t in move_ids}) != 4:
        raise ValueError("the four move names do not start with four different tokens after '<action>'")
    move_ids = torch.tensor([t[0] for t in move_ids])  # (4,)
    out = []
    for i, (seed, skill, sol) in enumerate(levels):
        other = levels[(i + 1) % len(levels)][1]
        obs = env.reset(seed)
        ans = _encode(tok, answer(sol[:n])) + [tok.eos_token_id]
        row = {"seed": seed, "solution": sol, "logp": {}, "top": {}, "tokens": {}}
        for cond, system in zip(CONDITIONS, (env.task_prompt(), skills.teacher_prompt(skill, env.task_prompt()),
                                             skills.teacher_prompt(other, env.task_prompt()))):
            prompt = prompt_ids(tok, system, obs)
            idx = torch.tensor([prompt + ans])  # (1, T)
            k = len(prompt) - 1  # the position that predicts the answer's first token
            with torch.no_grad():  # the head only where it is read: the answer's positions
                h = model(idx[:, :-1], return_hidden=True)[0, k:].float()  # (A, C), A = len(ans)
                logp = torch.log_softmax(h @ model.head_weight.float().T, -1)  # (A, V): row j predicts answer token j
            per = logp.gather(1, idx[0, k + 1:, None])[:, 0]  # (A,) each answer token's log-prob
            row["logp"][cond] = per.sum().item()
            row["tokens"][cond] = [(tok.decode([t]), round(v, 3), tok.decode([top])) for t, v, top
                                   in zip(ans, per.tolist(), logp.argmax(-1).tolist())]
            row["top"][cond] = envs.ACTION_NAMES[logp[len(head), move_ids].argmax().item()]
        out.append(row)
    return out


def report(rows):
    """The summary a user reads: mean log-prob per prompt, (b) > (c) count, top-move agreement per prompt."""
    N = len(rows)
    mean = {c: sum(r["logp"][c] for r in rows) / N for c in CONDITIONS}
    agree = {c: sum(r["top"][c] == r["solution"][0] for r in rows) for c in CONDITIONS}
    wins = sum(r["logp"]["own skill"] > r["logp"]["other skill"] for r in rows)
    return {"levels": N, "mean_logp": mean, "top_move_agrees": agree, "own_beats_other": wins,
            "delta_own_vs_plain": mean["own skill"] - mean["plain"],
            "delta_other_vs_plain": mean["other skill"] - mean["plain"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model to probe (as train.py --model)")
    p.add_argument("--env", default="sokoban", help="a Sokoban env (sokoban, sokoban-paper, sokoban-8x8-2)")
    p.add_argument("--n", type=int, default=24, help="training levels probed (the first n of the fixed set)")
    p.add_argument("--max-turns", type=int, default=3, help="turns in the task prompt, as the runs that will use it")
    p.add_argument("--form", default="answer", choices=["answer", "list"],
                   help="the privileged workflow as --summarizer oracle writes it (answer format, turn by turn) or "
                        "as a comma list of moves (the rule summariser's form for a solved level)")
    p.add_argument("--out", default=None, help="also write the per-level rows and the summary to this JSON file")
    p.add_argument("--tokens", action="store_true",
                   help="also print each answer token's log-prob and the model's top token there, per level and prompt")
    a = p.parse_args(argv)
    try:
        env = envs.make_env(a.env, max_turns=a.max_turns)
        if not isinstance(env, envs.Sokoban):
            raise ValueError(f"the probe needs a Sokoban env, not {a.env!r}")
        seeds = envs.task_set("train", a.n, env=a.env)
        model, tok = load_model(a.model)
        rows = probe(model, tok, env, seeds, a.form)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    s = report(rows)
    print(f"skill-reading probe: {a.model}, {s['levels']} training levels of {a.env}, first answer "
          f"'<action>m1 || ...</action>' of the solver's solution, workflow written as: {a.form}")
    print("| prompt | mean log-prob of the answer | top first move = solution's |\n|---|---|---|")
    for c in CONDITIONS:
        print(f"| {c} | {s['mean_logp'][c]:.2f} | {s['top_move_agrees'][c]} of {s['levels']} |")
    print(f"own skill - plain: {s['delta_own_vs_plain']:+.2f} nats; other skill - plain: "
          f"{s['delta_other_vs_plain']:+.2f} nats; own skill ahead of the other level's on {s['own_beats_other']} "
          f"of {s['levels']} levels")
    for r in rows if a.tokens else []:
        for c in CONDITIONS:
            print(f"level {r['seed']} {c:11s} {r['logp'][c]:7.2f}: " +
                  " ".join(f"{t!r} {v:.1f} (top {top!r})" for t, v, top in r["tokens"][c]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "env": a.env, "form": a.form, "summary": s, "levels": rows}, f, indent=1)


if __name__ == "__main__":
    main()
