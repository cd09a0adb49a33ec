"""A format-only warm-up: teach a small model the answer format with random moves, never solutions.

    python warmup.py --out runs/warm-format            # then: train.py / eval.py / study.py --model runs/warm-format
    python warmup.py --skill-batch 4 --out runs/warm-skills   # + skill reading (PRIVILEGED skills; a control)

At 135M, SmolLM2 rarely answers in the format at all (about 3 of 4 turns are invalid), so every episode fails
and GRPO groups have no spread to learn from. This script fine-tunes on conversations played with RANDOM moves
(1 to max moves per turn, uniform over Up/Down/Left/Right) on levels outside the train and eval sets, with the
loss on the model's turns only. It teaches where and how to answer, not what to answer: a solution never appears
(a random turn that happens to solve a level is not preferred over any other). The result is the base model of
every row of a study that uses it, the base row included.

--skill-batch N adds N skill-reading conversations per step, for the positive control of the distillation channel
(docs/control/PLAN.md): their system prompt is the teacher's (skills.teacher_prompt) holding the level's privileged
skill exactly as `train.py --summarizer oracle` writes it (the rule analyses of a group of random games, the
solver's shortest solution as the workflow), and their answers follow that workflow. The plain-prompt
conversations keep random moves, so what the model learns is to READ a skill, not how to solve levels unaided
(probe.py measures both). Levels 3_000_000+ (format) and 4_000_000+ (skills) are outside the train and eval sets.

Deliberate simplifications: conversations are rendered with the chat template and tokenized per segment (the
prompt, each answer, each observation), as rollout.py builds episodes; right padding, plain causal forward;
AdamW, constant learning rate.
"""
import argparse
import random
import sys

import torch

import envs
import losses
import skills
from model import load as load_model, save as save_model
from rollout import _encode, prompt_ids, template_pieces


def answer(moves):
    return "<action>" + " || ".join(moves) + "</action>"


def random_answers(env, turns, rng):
    """Lazily drawn (a game that ends early draws no more moves), so the format warm-up's random stream is as before."""
    return (answer([rng.choice(envs.ACTION_NAMES) for _ in range(rng.randint(1, env.max_actions_per_turn))])
            for _ in range(turns))


def oracle_skill(env, seed, rng, group_size=4, turns=2):
    """Level `seed`'s privileged skill as train.py --summarizer oracle writes it -> (skill, solution): the rule
    analyses of `group_size` games played with random answers, the solver's shortest solution as the workflow."""
    env.reset(seed)
    sol = envs.solve(env.room_fixed, env.room_state)
    group = []
    for _ in range(group_size):
        env.reset(seed)
        reward = sum(env.step(a)[1] for a in random_answers(env, turns, rng) if not env.done)
        group.append({"task_id": seed, "env": "sokoban", "task": "", "turns": [], "reward": reward,
                      "success": env.success, "facts": envs.sokoban_facts(env.history), "solution": sol,
                      "moves_per_turn": env.max_actions_per_turn})
    return (skills.summarize([group], backend="oracle") or [None])[0], sol


def conversation(tok, env, seed, answers, system=None):
    """One game played with the given answers -> (ids, loss mask): 1 on each answer's tokens and its eos. Built the
    way rollout.rollout builds an episode: the prompt, then per turn the answer + eos and the wrapped observation."""
    after_eos, user_pre, user_post = template_pieces(tok)
    ids = prompt_ids(tok, system or env.task_prompt(), env.reset(seed))
    mask = [0] * len(ids)
    for answer in answers:
        a = _encode(tok, answer) + [tok.eos_token_id]
        ids, mask = ids + a, mask + [1] * len(a)
        obs, _, done, _ = env.step(answer)
        if done:
            break
        between = _encode(tok, after_eos + user_pre + obs + user_post)
        ids, mask = ids + between, mask + [0] * len(between)
    return ids, mask


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model to warm up (as train.py --model)")
    p.add_argument("--env", default="sokoban", help="environment whose prompt and answer format are taught")
    p.add_argument("--max-turns", type=int, default=3, help="turns per episode, as the runs that will use it")
    p.add_argument("--turns", type=int, default=2, help="random turns per training conversation")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps")
    p.add_argument("--batch", type=int, default=4, help="format conversations (plain prompt, random moves) per step")
    p.add_argument("--skill-batch", type=int, default=0,
                   help="skill-reading conversations per step (teacher prompt with a PRIVILEGED skill; 0: none)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the levels and the random moves")
    p.add_argument("--out", required=True, help="output folder (HF format; pass it to --model)")
    a = p.parse_args(argv)
    if min(a.max_turns, a.turns, a.steps, a.batch) < 1 or a.lr <= 0 or a.skill_batch < 0:
        sys.exit("error: --max-turns, --turns, --steps, --batch must be >= 1, --skill-batch >= 0 and --lr > 0")
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    try:
        model, tok = load_model(a.model)
        template_pieces(tok, a.model)  # a chat template the conversations cannot follow: one error line
        env = envs.make_env(a.env, max_turns=a.max_turns)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    if a.skill_batch and not isinstance(env, envs.Sokoban):
        sys.exit("error: --skill-batch needs a Sokoban env (its skills hold a solver's solution)")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    model.train()
    skill_levels = (4_000_000 + i for i in range(10**6))
    for step in range(a.steps):
        # levels 3_000_000 + i: disjoint from the train (0..) and eval (1_000_000..) seed ranges
        batch = [conversation(tok, env, 3_000_000 + step * a.batch + i, random_answers(env, a.turns, rng))
                 for i in range(a.batch)]
        while len(batch) < a.batch + a.skill_batch:  # levels 4_000_000 + i whose solution fits the turn budget
            seed = next(skill_levels)
            skill, sol = oracle_skill(env, seed, rng)
            n = env.max_actions_per_turn
            if skill is not None and len(sol) <= n * a.max_turns:
                turns = [answer(sol[i:i + n]) for i in range(0, len(sol), n)]
                batch.append(conversation(tok, env, seed, turns, skills.teacher_prompt(skill, env.task_prompt())))
        T = max(len(ids) for ids, _ in batch)
        idx = torch.tensor([ids + [tok.pad_token_id] * (T - len(ids)) for ids, _ in batch])  # (B, T) right padding
        mask = torch.tensor([m + [0] * (T - len(m)) for _, m in batch], dtype=torch.bool)  # (B, T)
        h = model(idx[:, :-1], return_hidden=True)  # (B, T-1, C): position t predicts token t+1
        sel = mask[:, 1:]
        loss = -losses.token_logprobs(h[sel], model.head_weight, idx[:, 1:][sel]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step + 1}/{a.steps}: loss {loss.item():.3f} over {int(sel.sum())} answer tokens", flush=True)
    save_model(model, tok, a.out)
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
