"""Skill-SD training: GRPO on multi-turn episodes plus skill-conditioned on-policy self-distillation.

    python train.py                                        # embedded default: SmolLM2-135M, Sokoban 6x6, CPU
    torchrun --nproc_per_node=8 train.py --model Qwen/Qwen3-4B-Instruct-2507 ...   # see README

One step, top to bottom (PAPER.md section 2): draw tasks -> student rollouts under the plain prompt -> group
advantages -> summarise episodes into skills -> pick a skill per task (UCB) -> teacher log-probs of the student's
exact tokens under skill + task -> L = L_GRPO + lam * L_SDL over micro-batches, normalised by the global token
count -> one all-reduce of the gradients -> clip, step -> teacher sync -> log, evaluate, checkpoint.

Deliberate simplifications:
- One optimizer step per batch of rollouts, so logp_old is the sampler's own fp32 log-prob (the rollout tests pin
  it to the trainer's recomputation within 1e-4); no PPO epochs, no reference-model KL (the paper has none).
- Gradient sync is one explicit all-reduce of all gradients after the micro-batches (not DDP): it is one line,
  needs no no_sync() bookkeeping for gradient accumulation, and a rank with more or fewer micro-batches than
  the others can never hang a collective. Each rank holds a full replica.
- Randomness is derived from (seed, step, task group, sample): rollouts do not depend on the number of ranks or on
  resuming, so `--resume` continues exactly and 2 ranks reproduce a 1-process run.
- The summariser runs synchronously for the `rule` and `self` backends (deterministic); `openai:` runs in a
  background thread pool and its skills arrive at a later step.
"""
import argparse
import copy
import gc
import hashlib
import importlib.util
import json
import math
import os
import pickle
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard

import envs
import losses
import rollout
import skills
from eval import env_overrides, evaluate, plot, summarize, write_report
from model import Transformer, autocast, load as load_model, save as save_model

METHODS = {  # method -> (GRPO term, SDL term, student prompt carries the skill)
    "skill-sd": (True, True, False),
    "grpo": (True, False, False),
    "opd": (False, True, False),
    "skill-aug-grpo": (True, False, True),
}
# flags that change only where, how fast or what is logged: --resume with other values of these is not warned about
RUN_ONLY = {"out", "resume", "device", "fsdp", "micro_batch", "chunk_size", "shared_prefix", "tf32_grads", "save_every",
            "keep_checkpoints", "eval_every", "log_episodes", "wandb", "wandb_name", "summarizer_workers",
            "compile", "no_compile"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("method")
    g.add_argument("--method", default="skill-sd", choices=list(METHODS),
                   help="skill-sd = GRPO + lam*SDL; grpo; opd = SDL only; skill-aug-grpo = GRPO, skill in the prompt")
    g.add_argument("--lam", type=float, default=None,
                   help="SDL weight lambda; None: 0.001 (the paper's best) for skill-sd, 1 for opd")
    g.add_argument("--teacher", default="dynamic", choices=["dynamic", "frozen"],
                   help="dynamic: teacher synced from the student; frozen: teacher keeps the initial weights")
    g.add_argument("--teacher-sync-every", type=int, default=1,
                   help="dynamic teacher: copy the student into it every K steps (1: the student itself, no copy)")
    g.add_argument("--rollout-owner", default="student", choices=["student", "teacher"],
                   help="who plays: the student (plain prompt) or the teacher (the paper's off-policy ablation)")
    g.add_argument("--eps-low", type=float, default=0.2, help="GRPO lower clip: ratio >= 1 - eps_low")
    g.add_argument("--eps-high", type=float, default=0.28, help="GRPO upper clip: ratio <= 1 + eps_high")
    g.add_argument("--summarizer", default="rule",
                   help="rule (deterministic, offline), self (the policy), openai:BASE_URL ($OPENAI_API_KEY), or "
                        "oracle (Sokoban, PRIVILEGED: the solver's shortest solution as the workflow; a control)")
    g.add_argument("--summarizer-model", default=None, help="model name for an openai: summariser")
    g.add_argument("--skill-file", default=None,
                   help="one JSON skill (the three fields) for every task instead of the bank (static skills)")
    g.add_argument("--ucb-c", type=float, default=0.2,
                   help="UCB exploration constant in arm-reward units (see skills.SkillBank for why 0.2)")
    g.add_argument("--skill-fallback", default="none", choices=["none", "pool"],
                   help="task without a skill: none = not distilled (the paper's); pool = a labelled other-level skill")
    g.add_argument("--sdl-estimator", default="k3", choices=["k3", "full"],
                   help="k3 = the paper's sampled-token estimator; full = exact reverse KL over the vocabulary")
    g.add_argument("--summarizer-wait", type=float, default=0.0,
                   help="openai: seconds a step may wait for pending summaries (0: skills arrive at later steps)")
    g.add_argument("--summarizer-workers", type=int, default=2,
                   help="openai: summariser requests in flight at once (one task group each)")
    g.add_argument("--no-structured-output", action="store_true",
                   help="openai: ask for plain text, not JSON output (negotiated: json_schema, json_object, text)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--steps", type=int, default=24, help="training steps")
    g.add_argument("--prompts-per-step", type=int, default=2, help="tasks per step, all ranks together")
    g.add_argument("--group-size", type=int, default=4, help="episodes per task (GRPO group), >= 2")
    g.add_argument("--micro-batch", type=int, default=4, help="episodes per forward/backward")
    g.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk of the fused log-prob kernel")
    g.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                   help="run a group's shared prompt once per micro-batch (same gradients up to rounding; README)")
    g.add_argument("--tf32-grads", action="store_true",
                   help="CUDA: LM-head gradient matmuls on TF32 (log-probs stay fp32; ~5e-4 gradient rounding)")
    g.add_argument("--grad-norms", action="store_true",
                   help="log the GRPO and SDL terms' gradient norms apart (skill-sd; one extra backward per micro-batch)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over ranks (FSDP2) when they do not fit")
    g = p.add_argument_group("rollouts")
    g.add_argument("--env", default="sokoban",
                   help="sokoban (6x6, 1 box), sokoban-paper (2 boxes, 96 + 64 fixed levels), sokoban-8x8-2, appworld")
    g.add_argument("--train-tasks", type=int, default=16,
                   help="training set: its first N levels (skills are per task, so levels must come back; paper: 96)")
    g.add_argument("--curriculum-start", type=float, default=1.0,
                   help="fraction of the easiest-first levels eligible at step 0, growing to all (1: no curriculum)")
    g.add_argument("--curriculum-full-at", type=float, default=0.5,
                   help="fraction of the run from which every training level is eligible")
    g.add_argument("--reward", default="completion", choices=["completion", "shaped"],
                   help="completion = fraction of boxes on targets at the end (the paper's); shaped = gym-sokoban's")
    g.add_argument("--max-turns", type=int, default=3, help="turns per episode")
    g.add_argument("--parse", default="lenient", choices=["strict", "lenient"],
                   help="strict = only <action>..</action>; lenient = move words anywhere (for the 135M demo model)")
    g.add_argument("--max-new-tokens", type=int, default=24, help="token budget per model turn")
    g.add_argument("--temperature", type=float, default=0.7,
                   help="rollout temperature; the policy trained and distilled is softmax(logits / T)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    g.add_argument("--max-len", type=int, default=None,
                   help="most tokens an episode may hold, longer ones are cut (None: max_position_embeddings)")
    g.add_argument("--no-compile", action="store_true",
                   help="decode eagerly (default: compile the decode step where torch.compile works)")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step (the default; a failed compile warns once, then decodes eagerly)")
    g = p.add_argument_group("run")
    g.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (embedded), 'tiny', an HF id or folder")
    g.add_argument("--out", default="runs/default", help="output folder (metrics, episodes, skills, checkpoints)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out; warns of changed flags")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    g.add_argument("--eval-every", type=int, default=8, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--eval-n", type=int, default=32, help="evaluation puzzles (first n of the fixed eval set)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2,
                   help="checkpoints kept (2: --resume falls back to the older if the newest is damaged)")
    g.add_argument("--log-episodes", type=int, default=2, help="episodes per step written to episodes.jsonl")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="log to this W&B project (pip install wandb; WANDB_MODE=offline: OUT/wandb/ to sync later)")
    g.add_argument("--wandb-name", default=None, help="W&B run name (default: W&B's random one)")
    args = p.parse_args(argv)

    grpo, sdl, _ = METHODS[args.method]
    if args.lam is None:
        args.lam = 0.001 if grpo else 1.0
    checks = [(sdl or args.rollout_owner != "teacher",
               "--rollout-owner teacher needs a teacher: use --method skill-sd or opd"),
              (sdl or (args.teacher == "dynamic" and args.teacher_sync_every == 1),
               f"--teacher / --teacher-sync-every only apply to methods with a teacher (skill-sd, opd), "
               f"not --method {args.method}"),
              (args.summarizer_wait >= 0, "--summarizer-wait must be >= 0"),
              (args.group_size >= 2, "--group-size must be >= 2 (advantages are relative within a group)"),
              (min(args.prompts_per_step, args.micro_batch, args.keep_checkpoints, args.teacher_sync_every,
                   args.max_turns, args.max_new_tokens, args.summarizer_workers) >= 1 and args.steps >= 0,
               "--steps must be >= 0; --prompts-per-step, --micro-batch, --keep-checkpoints, --teacher-sync-every, "
               "--max-turns, --max-new-tokens and --summarizer-workers >= 1"),
              (0 < args.curriculum_start <= 1 and 0 <= args.curriculum_full_at <= 1,
               "--curriculum-start must be in (0, 1] and --curriculum-full-at in [0, 1]"),
              (args.lam >= 0 and args.lr > 0, "--lam must be >= 0 and --lr > 0"),
              (not args.grad_norms or (grpo and sdl and not args.fsdp),
               "--grad-norms needs --method skill-sd (both terms) and no --fsdp"),
              (args.temperature >= 0 and 0 < args.top_p <= 1, "--temperature >= 0 and 0 < --top-p <= 1"),
              (0 <= args.eps_low < 1 and args.eps_high >= 0, "0 <= --eps-low < 1 and --eps-high >= 0"),
              (not args.wandb or importlib.util.find_spec("wandb") is not None,
               "--wandb needs the wandb package: pip install wandb"),
              (args.wandb or not args.wandb_name, "--wandb-name needs --wandb PROJECT")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    try:
        skills.check_backend(args.summarizer, complete=(lambda x: x), model=args.summarizer_model)
    except ValueError as e:
        p.error(str(e))
    return args


# ------------------------------------------------------------------------------------------------------------
# distributed helpers: plain `python train.py` is one process; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK

def setup_dist(args):
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world:
        sys.exit(f"error: --prompts-per-step ({args.prompts_per_step}) must be divisible by the number of "
                 f"processes ({world}): a task group never spans ranks")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_gather_objects(obj, world):
    """Every rank's obj, in rank order (all ranks get the same list)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def allreduce_grads(model, world, fsdp):
    """Sum the gradients over ranks in one flat buffer (the loss is already divided by the global token count).
    Under FSDP the backward pass has already reduce-scattered them (summed: see `shard`)."""
    if world == 1 or fsdp:
        return
    params = [q for q in model.parameters() if q.requires_grad]
    flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in params])
    dist.all_reduce(flat)
    for q, g in zip(params, flat.split([q.numel() for q in params])):
        q.grad = g.view_as(q)  # views of one buffer: no copy back


def shard(model):
    """FSDP2: every block is one sharded group, the root (embedding, final norm, head) another. Gradients are
    summed, not averaged, over ranks, because the loss is already divided by the global token count."""
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


@contextmanager
def full_weights(*models):
    """Full weights for sampling, scoring and evaluation under FSDP. Ranks decode different numbers of tokens,
    so the all-gather inside every forward would hang; instead gather once here, run collective-free, reshard.
    A no-op for replicated models."""
    mods = [m for model in models if model is not None for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            # blocks free their full weights after forward; the root keeps them, as the fused head reads them
            m.set_reshard_after_forward(m not in [model for model in models], recurse=False)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def episode_rngs(seed, step, groups, G):
    """One generator per episode, from (seed, step, global group index, sample index) only: rollouts do not
    depend on the number of ranks, on which groups share a batch, or on resuming."""
    return [torch.Generator().manual_seed(((seed * 1_000_003 + step) * 10_007 + g) * 1_009 + j)
            for g in groups for j in range(G)]


# ------------------------------------------------------------------------------------------------------------
# pieces of a step

def build(model, use_sdl, args):
    """The teacher, (model, teacher) sharded under --fsdp, and the optimizer. The teacher is None when it is the
    student itself (dynamic, K = 1: the pre-update weights of this step), else a copy refreshed every K steps or
    the initial weights (frozen)."""
    own = use_sdl and (args.teacher == "frozen" or args.teacher_sync_every > 1)  # a teacher with its own weights
    teacher = copy.deepcopy(model).requires_grad_(False) if own else None
    if args.fsdp:
        model, teacher = shard(model), teacher and shard(teacher)
    # no model.train() / model.eval() anywhere: the model has no dropout, so both modes compute the same
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    return model, teacher, opt


def play(player, tok, make_env, seeds, generators, args, system_prompts=None):
    """G episodes of each task in one batch, sampled without gradient (student or teacher, plain or skill prompt)."""
    with torch.no_grad(), autocast(next(player.parameters()).device):
        return rollout.rollout(player, tok, make_env, seeds, args.group_size, args.max_turns, args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, generator=generators,
                               max_len=args.max_len, system_prompts=system_prompts)


def episode_dict(ep, env_name, task_prompt, oracle=None):
    """The plain record the summariser sees (no tensors). oracle: (solution, moves per turn) for --summarizer oracle."""
    return {"task_id": ep.task_id, "env": env_name, "task": task_prompt + "\n\n" + (ep.observations[0] if ep.observations else ""),
            "turns": [{"response": r, "observation": o} for r, o in zip(ep.responses, ep.observations[1:] + [""])],
            "reward": ep.reward, "success": ep.success,
            "facts": envs.sokoban_facts(ep.history) if env_name.startswith("sokoban") else None,
            **({"solution": oracle[0], "moves_per_turn": oracle[1]} if oracle else {})}


def policy_logprobs(model, episodes, pad_id, device, inv_t, args):
    """Hidden states / T at the episodes' sampled positions, flattened row-major over their mask, and their fp32
    log-probs under the tempered policy softmax(logits / T) = softmax((h / T) @ W.T): (n, C), (n,); and the
    batch dict. With --shared-prefix each group's common prompt runs once (rollout.sampled_hidden)."""
    h, b = rollout.sampled_hidden(model, episodes, pad_id, device, shared_prefix=args.shared_prefix)  # (n, C)
    hs = h.float() * inv_t
    return hs, losses.token_logprobs(hs, model.head_weight.float(), b["tgt"][b["mask"] > 0], args.chunk_size,
                                     tf32_grads=args.tf32_grads), b


def teacher_logprobs(t_model, episodes, ids, pad_id, device, inv_t, args):
    """The teacher's (hidden states / T, log-probs) at every episode's sampled tokens, as two dicts episode id ->
    (n_i, C) and -> (n_i,), computed in micro-batches without gradient. The hidden states are kept only for
    --sdl-estimator full. The episodes carry the teacher's prompt: `reprompt` swaps only the prompt, so every
    episode keeps its sampled tokens, their order and count, and the flat outputs split back by its own mask."""
    hs_out, logp_out = [], []
    with torch.no_grad():
        for j in range(0, len(episodes), args.micro_batch):
            chunk = episodes[j:j + args.micro_batch]
            hs, logp, _ = policy_logprobs(t_model, chunk, pad_id, device, inv_t, args)
            counts = [sum(e.mask) for e in chunk]
            hs_out += hs.split(counts) if args.sdl_estimator == "full" else [None] * len(chunk)
            logp_out += logp.split(counts)
    return dict(zip(ids, hs_out)), dict(zip(ids, logp_out))


def sdl_term(logp, hs, b, rows, logp_teacher, hs_teacher, model, teacher, num_tokens, args):
    """L_SDL of one micro-batch on the rows that have a teacher (episode index in logp_teacher): the paper's
    sampled-token k3 estimator on the (b, T) grid, or the exact full-vocabulary reverse KL at the same positions.
    Returns (loss, metrics, number of distilled tokens)."""
    sel = b["mask"] > 0  # (b, T)
    dmask = torch.stack([b["mask"][r] * (i in logp_teacher) for r, i in enumerate(rows)])  # (b, T)
    if args.sdl_estimator == "k3":
        logp_teacher_grid = torch.zeros(sel.shape, device=logp.device)  # (b, T)
        for r, i in enumerate(rows):
            if i in logp_teacher:
                logp_teacher_grid[r, sel[r]] = logp_teacher[i].to(logp.device)
        loss, metrics = losses.sdl_loss(logp, b["logp_old"], logp_teacher_grid, dmask, num_tokens=num_tokens)
    else:
        hs_t = torch.cat([hs_teacher[i].to(hs.device) if i in hs_teacher else hs.new_zeros(n, hs.shape[1])
                          for i, n in zip(rows, sel.sum(1).tolist())])  # (n, C)
        loss, metrics = losses.sdl_full_loss(hs, model.head_weight.float(), hs_t,
                                             (teacher or model).head_weight.detach().float(), dmask[sel],
                                             num_tokens=num_tokens, chunk_size=args.chunk_size)
    n_distill = dmask.sum().item()
    return loss, (metrics if n_distill else {}), n_distill


def optimizer_step(model, opt, world, args):
    """One gradient all-reduce, clip, step; a non-finite norm skips the step on every rank alike."""
    allreduce_grads(model, world, args.fsdp)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # a DTensor under FSDP
    skipped = not math.isfinite(gnorm.item())
    if not skipped:  # the non-finite gradients are dropped by the next step's zero_grad
        opt.step()
    return gnorm.item(), skipped


def pearson(x, y):
    """Correlation of two equal-length lists; None when either is constant (or shorter than 2)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or x.std() < 1e-12 or y.std() < 1e-12:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def turn_centred(gap, rows):
    """Per episode of one group (rows: its distilled episodes; gap: episode -> per-turn lists of logp_teacher - logp):
    its mean gap turn by turn minus the group's mean at that turn (over the episodes that reached it), averaged
    over its turns. Why not a plain per-episode mean: the gap's level differs from turn to turn (by turn on the
    default run: +0.004, -0.052, -0.010 nats) and episodes end at different turns (a solved one stops early), so a
    per-episode mean would rank episodes by WHERE THEY ENDED, not by how the teacher judged their tokens."""
    means = {i: [float(np.mean(t)) for t in gap[i]] for i in rows}  # episode -> mean gap per turn
    K = max((len(v) for v in means.values()), default=0)
    centre = [np.mean([v[k] for v in means.values() if len(v) > k]) for k in range(K)]
    return [float(np.mean([g - c for g, c in zip(means[i], centre)])) for i in rows]


def arm_rewards(rewards, adv, gap, skill_in_student):
    """The UCB arm reward of each of this rank's groups, None where the group carries no information. For the
    teacher methods: the within-group correlation of the advantages A_i with the episodes' turn-centred gaps
    (turn_centred), in [-1, 1] (does the skill-conditioned teacher favour the better episodes?); None for a group
    with equal rewards (A = 0) or without a teacher. Skill-augmented GRPO has no teacher: the mean reward of the
    group the skill guided."""
    P, G = rewards.shape
    if skill_in_student:
        return [rewards[g].mean().item() for g in range(P)]
    rows = [list(range(g * G, (g + 1) * G)) for g in range(P)]
    return [pearson([adv[i] for i in r], turn_centred(gap, r)) if all(i in gap for i in r) else None for r in rows]


def add_metrics(tally, metrics, weight):
    """Tally a loss's metrics: token-weighted sums, except the maxima of keys ending in _max."""
    for k, v in metrics.items():
        tally[k] = max(tally.get(k, -math.inf), float(v)) if k.endswith("_max") else tally.get(k, 0.0) + float(v) * weight


def reduce_metrics(parts, world):
    """One metrics dict from every rank's (means, weighted, summed, maxed, counts): per-episode means averaged
    (every rank has as many episodes), (sum, weight) pairs divided after summing both, sums and counts summed,
    maxima maxed. Pure: no communication."""
    means, weighted, summed, maxed, counts = zip(*parts)
    m = {k: sum(p[k] for p in means) / world for k in means[0]}
    for k in sorted(set().union(*weighted)):
        num, den = (sum(p[k][i] for p in weighted if k in p) for i in (0, 1))
        m[k] = num / den if den else None
    m.update({k: None if v is None else sum(p[k] for p in summed) for k, v in summed[0].items()})
    m.update({k: max(p[k] for p in maxed if k in p) for k in sorted(set().union(*maxed))})
    total = {k: sum(p.get(k, 0) for p in counts) for k in sorted(set().union(*counts))}
    return m, total


def step_metrics(step, eps, rewards, frac_zero_var, adv, gap, tally, use_grpo, use_sdl, summarizer, bank, new_skills, world,
                 turns_max):
    """The step's metrics over all ranks (a collective: every rank calls it). teacher_adv_corr: over the step's
    distilled episodes in groups with unequal rewards, the correlation of A_i with the episode's turn-centred gap
    (turn_centred: positive = the skill-conditioned teacher prefers the better episodes, which is what SDL needs;
    the centring removes each skill's and each turn's overall offset). gap_turn1, ...: the mean gap per turn."""
    P, G = rewards.shape
    n_local = sum(sum(e.mask) for e in eps)
    means = {"reward": rewards.mean().item(), "success": float(np.mean([e.success for e in eps])),
             "completion": float(np.mean([e.completion for e in eps])), "frac_zero_var": frac_zero_var,
             "distill_frac": len(gap) / len(eps) if use_sdl else 0.0,
             "truncated": float(np.mean([e.truncated for e in eps])), "turns": float(np.mean([len(e.responses) for e in eps]))}
    n_distill = tally.get("n_distill", 0.0)
    flat = {i: sum(v, []) for i, v in gap.items()}
    by_turn = {f"gap_turn{k + 1}": (sum(sum(v[k]) for v in gap.values() if len(v) > k),
                                    sum(len(v[k]) for v in gap.values() if len(v) > k)) for k in range(turns_max)}
    weighted = {"entropy": (tally.get("entropy_sum", 0.0), n_local), "gap": (sum(sum(v) for v in flat.values()), n_distill),
                **by_turn,
                **{k: (tally[k], n_local) for k in ("clip_frac", "ratio_mean") if k in tally},
                **{k: (tally[k], n_distill) for k in ("l_mean", "rho_mean", "k3_mean", "kl_mean") if k in tally}}
    summed = {"loss_grpo": tally.get("loss_grpo", 0.0) if use_grpo else None,
              "loss_sdl": tally.get("loss_sdl", 0.0) if use_sdl else None, "tokens": n_local}
    maxed = {k: tally[k] for k in ("ratio_max", "rho_max") if k in tally}
    counts = {k: v for k, v in summarizer.stats.items() if isinstance(v, (int, float))}  # per rank: summed
    pairs = []  # (A_i, turn-centred gap, plain per-episode mean gap) of distilled episodes in groups with unequal rewards
    for g in range(P):
        rows = [i for i in range(g * G, (g + 1) * G) if i in gap]
        if rows and rewards[g].std() > 0:
            ep_mean = [np.mean(flat[i]) for i in rows]
            pairs += list(zip([adv[i] for i in rows], turn_centred(gap, rows), np.subtract(ep_mean, np.mean(ep_mean))))
    parts = all_gather_objects((means, weighted, summed, maxed, counts, pairs), world)
    m, total = reduce_metrics([p[:5] for p in parts], world)
    pairs = sum((p[5] for p in parts), [])
    ages = [step - k.step for k in new_skills]
    corr = lambda k: pearson(*list(zip(*pairs))[0:k + 1:k]) if len(pairs) > 1 else None  # noqa: E731
    # teacher_adv_corr_episode_mean: the old statistic, kept to show what the turn centring changes (docs/control)
    return {"step": step + 1, **m, "teacher_adv_corr": corr(1), "teacher_adv_corr_episode_mean": corr(2),
            "skills": {**bank.metrics(), "new": len(new_skills), "age_mean": float(np.mean(ages)) if ages else None,
                       "age_max": max(ages) if ages else None},
            "summarizer": total}


def peak_memory_gb(device):  # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux)
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30


def write_logs(args, m, step, eps, student_eps, picked, bank, run):
    """Rank 0: the step's metrics line, the tracker, the bank, and a few episodes, decoded AND as token ids / mask
    / sampler log-probs, so anyone can re-score them."""
    with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(m) + "\n")
    if run is not None:  # W&B: the numbers (nested dicts as section/key), and an evaluation step's per-task table
        import wandb
        flat = {f"{k}/{kk}" if isinstance(v, dict) else k: vv
                for k, v in m.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
        row = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and k != "step"}
        if m.get("eval_acc") is not None and os.path.exists(os.path.join(args.out, "eval.json")):
            results = json.load(open(os.path.join(args.out, "eval.json")))["results"]
            row["eval/tasks"] = wandb.Table(columns=list(results[0]), data=[list(r.values()) for r in results])
        run.log(row, step=m["step"])
    bank.save(os.path.join(args.out, "skills.json"))
    G = args.group_size
    with open(os.path.join(args.out, "episodes.jsonl"), "a") as f:
        for i, e in enumerate(eps[:args.log_episodes]):
            f.write(json.dumps({"step": step + 1, "task_id": e.task_id, "reward": e.reward, "success": e.success,
                                "skill": None if picked[i // G] is None else picked[i // G].golden_workflow,
                                "responses": e.responses, "observations": e.observations,
                                "tokens": student_eps[i].tokens, "mask": student_eps[i].mask,
                                "logprobs": student_eps[i].logprobs}) + "\n")


def read_skill_file(path):
    """--skill-file: one static skill for every task (None without the flag). OSError if it cannot be read."""
    skill = skills.parse_skill(open(path).read()) if path else None
    if path and skill is None:
        raise ValueError(f"{path} holds no skill JSON with success_analysis, mistake_analysis, golden_workflow")
    return skill


def oracle_solutions(make_env, seeds):
    """--summarizer oracle: task -> (the solver's shortest solution, moves per turn). PRIVILEGED: a control only."""
    out, env = {}, make_env()
    if not isinstance(env, envs.Sokoban):
        raise ValueError("--summarizer oracle needs a Sokoban env (it writes a solver's solution as the workflow)")
    for s in seeds:
        env.reset(s)
        sol = envs.solve(env.room_fixed, env.room_state)
        if sol is None:
            raise ValueError(f"--summarizer oracle: the solver found no solution of training level {s}")
        out[s] = (sol, env.max_actions_per_turn)
    return out


def make_summarizer(args, model, tok, device):
    """The skill summariser; `self` asks the policy itself, greedily."""
    def complete(prompts):
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q in prompts]
        with torch.no_grad(), autocast(device):
            return rollout.generate(model, tok, texts, max_new_tokens=256, temperature=0.0)
    return skills.AsyncSummarizer(args.summarizer, complete=complete, sync=not args.summarizer.startswith("openai:"),
                                  workers=args.summarizer_workers, model=args.summarizer_model,
                                  structured=not args.no_structured_output)


def check_max_len(args, tok, env, seed):
    """--max-len must hold the first training task's prompt and one full model turn (ValueError otherwise);
    a skill-conditioned prompt is longer still."""
    if args.max_len is None:
        return
    prompt = len(rollout.prompt_ids(tok, env.task_prompt(), env.reset(seed)))
    if args.max_len < prompt + args.max_new_tokens:
        raise ValueError(f"--max-len {args.max_len} is too small: the prompt takes {prompt} tokens and a turn "
                         f"{args.max_new_tokens} (--max-new-tokens), so use at least {prompt + args.max_new_tokens}")


# ------------------------------------------------------------------------------------------------------------
# checkpoints: OUT/ckpt-STEP/ = an HF model folder + trainer.pt + skills.json + manifest.json; experiment tracking

def crash_point(step, where):
    """Fault injection for the tests: SKILL_SD_CRASH=STEP:WHERE ends the process here at once, like kill -9."""
    if os.environ.get("SKILL_SD_CRASH") == f"{step}:{where}":
        os._exit(137)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(out, step, model, tok, opt, bank, teacher, extra, args, rank):
    """Every rank calls it (gathering sharded state is collective); rank 0 writes ckpt-STEP.tmp, then its
    manifest.json (size and sha256 of every file) last, renames it to ckpt-STEP and points `latest` at it.
    A folder without a matching manifest is never resumed from. extra: a dict of plain data and tensors, saved
    in trainer.pt and handed back by load_checkpoint, so new entries need no change here."""
    weights = get_model_state_dict(model, options=FULL)
    optim = get_optimizer_state_dict(model, opt, options=FULL)
    t_weights = get_model_state_dict(teacher, options=FULL) if teacher is not None and args.teacher == "dynamic" else None
    if rank != 0:
        return
    name = f"ckpt-{step:06d}"
    tmp = os.path.join(out, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):  # no second random init: the gathered weights are assigned in place
        plain = Transformer(model.config)
    plain.load_state_dict(weights, assign=True)
    save_model(plain, tok, tmp)
    crash_point(step, "model")
    # the global RNG streams, though our draws all come from seeded generators (episode_rngs): a fork that draws
    # from them resumes exactly too. numpy's key array as a list: weights_only loading refuses numpy arrays
    kind, keys, *rest = np.random.get_state()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), *rest]}
    state = {**extra, "step": step, "optimizer": optim, "args": vars(args), "rng": rng, "teacher": t_weights}
    torch.save(state, os.path.join(tmp, "trainer.pt"))
    crash_point(step, "trainer")
    bank.save(os.path.join(tmp, "skills.json"))
    files = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": sha256(os.path.join(tmp, f))}
             for f in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
    crash_point(step, "manifest")
    final = os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    crash_point(step, "renamed")
    with open(os.path.join(out, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    stale = [d for d in os.listdir(out) if d.startswith("ckpt-") and d.endswith(".tmp")]  # cut off by a crash
    for d in checkpoints(out)[:-args.keep_checkpoints] + stale:  # only once the new one is complete
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)


def checkpoints(out):
    """Checkpoint folder names in OUT, oldest first (unfinished .tmp and renamed .damaged ones excluded)."""
    return sorted(d for d in os.listdir(out) if d.startswith("ckpt-") and d[5:].isdigit())


def verify(folder):
    """None when folder holds a complete checkpoint (every manifest file, same size and sha256), else what is wrong."""
    try:
        manifest = json.load(open(os.path.join(folder, "manifest.json")))
        files, step = manifest["files"], manifest["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "manifest.json is missing or unreadable (cut off, or written by an older version)"
    if f"ckpt-{step:06d}" != os.path.basename(folder) or not {"trainer.pt", "skills.json", "config.json"} <= set(files):
        return "manifest.json does not describe this checkpoint"
    for f, want in files.items():
        path = os.path.join(folder, f)
        if not os.path.isfile(path):
            return f"{f} is missing"
        if os.path.getsize(path) != want["bytes"]:
            return f"{f} has {os.path.getsize(path)} bytes, the manifest says {want['bytes']}"
        if sha256(path) != want["sha256"]:
            return f"{f} does not match its sha256"
    return None


def load_checkpoint(out, model, opt, teacher, device, rank, world):
    """--resume: restore model, optimizer, teacher and RNG states from the newest complete checkpoint in OUT and
    cut the logs back to its step. A damaged newer one is reported, renamed to *.damaged and skipped. trainer.pt
    loads with weights_only=True: tensors and plain data only, never pickled code. Returns (step, bank, state),
    state being trainer.pt's dict (with save_checkpoint's `extra` entries)."""
    found, damaged = None, []
    if rank == 0:  # rank 0 verifies; every rank loads the one it chose
        for d in reversed(checkpoints(out) if os.path.isdir(out) else []):
            why = verify(os.path.join(out, d))
            if why is None:
                found = d
                break
            damaged.append((d, why))
    found = all_gather_objects(found, world)[0]
    if found is None:
        sys.exit(f"error: --resume but no complete checkpoint in {out}" +
                 "".join(f"; {d}: {why}" for d, why in damaged))
    # a ckpt-N.tmp that a crash cut off is never resumed from; the next save_checkpoint removes it
    for d, why in damaged:  # rank 0 only
        print(f"warning: checkpoint {d} is damaged ({why}): renamed to {d}.damaged, resuming from {found}", flush=True)
        shutil.rmtree(os.path.join(out, d + ".damaged"), ignore_errors=True)
        os.replace(os.path.join(out, d), os.path.join(out, d + ".damaged"))
    folder = os.path.join(out, found)
    try:
        state = torch.load(os.path.join(folder, "trainer.pt"), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch names the first object it refused after "GLOBAL "
        sys.exit(f"error: refusing {folder}/trainer.pt: it holds {str(e).partition('GLOBAL ')[2].split(' ')[0]!r}, "
                 f"not only tensors and plain data, and loading it could run code")
    try:
        set_model_state_dict(model, load_model(folder, device=device)[0].state_dict(), options=FULL)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=FULL)
        if state["teacher"] is not None and teacher is not None:
            set_model_state_dict(teacher, state["teacher"], options=FULL)
        bank = skills.SkillBank.load(os.path.join(folder, "skills.json"))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        sys.exit(f"error: {folder} does not fit this run (another --model or --method?): {str(e).splitlines()[0][:200]}")
    kind, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if rank == 0:
        for f in ("metrics.jsonl", "episodes.jsonl"):
            truncate_jsonl(os.path.join(out, f), state["step"])
        print(f"resuming from {folder} (step {state['step']})", flush=True)
    return state["step"], bank, state


def truncate_jsonl(path, last_step):
    """On resume, drop lines logged after the checkpoint (a crash between logging and checkpointing), and a
    last line cut off by the crash (no newline)."""
    if not os.path.exists(path):
        return
    keep = [ln for ln in open(path) if ln.endswith("\n") and ln.strip() and json.loads(ln)["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def start_run(args, rank, world, device, model):
    """The output folder, args.json (--resume: one warning lists the flags that differ from it, RUN_ONLY aside) and
    the run's header line; returns the W&B run (--wandb, rank 0 only) or None. A resumed run continues the same
    W&B run (its id is kept in OUT/wandb-id); W&B drops the re-logged steps, which resuming reproduces exactly."""
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot use --out {args.out} as the output folder: {e.strerror}")
    if rank == 0:
        path = os.path.join(args.out, "args.json")
        was = json.load(open(path)) if args.resume and os.path.exists(path) else {}
        changed = [f"--{k.replace('_', '-')} {was[k]} -> {v}" for k, v in vars(args).items()
                   if k in was and k not in RUN_ONLY and was[k] != v]
        if changed:  # the run goes on with the new values; what it means changed from this step on
            print(f"warning: --resume with flags that change what the run means: {', '.join(changed)}", flush=True)
        json.dump(vars(args), open(path, "w"), indent=1)
        print(f"{args.method} | model {args.model} ({sum(q.numel() for q in model.parameters()) / 1e6:.1f}M params)"
              f" | {args.env} | {world} process(es) on {device} | out {args.out}", flush=True)
    if not args.wandb or rank != 0:
        return None
    import wandb
    id_file = os.path.join(args.out, "wandb-id")
    run_id = open(id_file).read().strip() if args.resume and os.path.exists(id_file) else None  # None: a new one
    try:
        run = wandb.init(project=args.wandb, name=args.wandb_name, id=run_id, resume="allow", dir=args.out,
                         config=vars(args))
    except Exception as e:  # wandb raises many kinds (no login, no network): one line for all
        sys.exit(f"error: wandb.init failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); "
                 f"WANDB_MODE=offline logs locally for a later `wandb sync`")
    with open(id_file, "w") as f:
        f.write(run.id)
    return run


def run_eval(model, tok, args, rank, world, device, step):
    """Greedy evaluation on the first --eval-n held-out tasks, split over ranks; rank 0 writes the report."""
    seeds = envs.task_set("eval", args.eval_n, env=args.env)
    with torch.no_grad(), autocast(device), full_weights(model):
        mine = evaluate(model, tok, args.env, seeds[rank::world], args.max_new_tokens, env_overrides(args, "eval"),
                        temperature=0.0, seed=args.seed)
    results = sorted(sum(all_gather_objects(mine, world), []), key=lambda r: seeds.index(r["task_id"]))
    summary = summarize(results)
    if rank == 0:
        write_report(args.out, f"{args.model} @ step {step} ({args.method}, {args.parse} parsing)", results, summary)
    return {"eval_acc": summary["acc"], "eval_comp": summary["comp"], "eval_invalid": summary.get("invalid_rate")}


# ------------------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    if args.no_compile or args.compile:
        rollout.COMPILE = args.compile and not args.no_compile
    rank, world, device = setup_dist(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    use_grpo, use_sdl, skill_in_student = METHODS[args.method]
    uses_bank = (use_sdl or skill_in_student) and not args.skill_file  # grpo needs no summariser at all

    try:
        model, tok = load_model(args.model, device=device)
        rollout.template_pieces(tok, args.model)  # a chat template the sampler cannot follow: one error line
        make_env = lambda: envs.make_env(args.env, **env_overrides(args))  # noqa: E731
        task_prompt = make_env().task_prompt()
        train_seeds = envs.task_set("train", args.train_tasks, env=args.env)
        check_max_len(args, tok, make_env(), train_seeds[0])
        if args.eval_n > 0:
            envs.task_set("eval", args.eval_n, env=args.env)
        fixed_skill = read_skill_file(args.skill_file)
        oracle = oracle_solutions(make_env, train_seeds) if args.summarizer == "oracle" and uses_bank else {}
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    pad_id = tok.pad_token_id
    model, teacher, opt = build(model, use_sdl, args)
    bank = skills.SkillBank(c=args.ucb_c, seed=args.seed)
    summarizer = make_summarizer(args, model, tok, device)

    start = 0
    if args.resume:
        start, bank, state = load_checkpoint(args.out, model, opt, teacher, device, rank, world)
        saved = state["summarizer"]  # every rank's counters (each rank summarises its own groups)
        summarizer.stats.update(saved[rank] if len(saved) == world else {})  # another world size: counts restart
    run = start_run(args, rank, world, device, model)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", unit="step",
               disable=rank != 0, dynamic_ncols=True)
    P, G = args.prompts_per_step // world, args.group_size  # this rank's groups, episodes per group
    # The policy trained (and distilled) is the one that sampled: softmax(logits / T). Greedy (T = 0) -> T = 1.
    inv_t = 1.0 / args.temperature if args.temperature > 0 else 1.0
    for step in bar:
        t0 = time.time()
        # 1. tasks: one permutation of the eligible (curriculum) tasks per step, the same on every rank (the
        #    constant only decorrelates it from the episode seeds). Every rank picks the skills of ALL groups, so
        #    every rank's bank stays identical; rank r then takes its own P groups.
        n_elig = envs.curriculum(len(train_seeds), step, args.steps, args.curriculum_start, args.curriculum_full_at)
        order = np.random.default_rng(args.seed * 7919 + step).permutation(n_elig)
        all_seeds = [train_seeds[order[g % n_elig]] for g in range(P * world)]
        all_picked = [fixed_skill or (bank.select(s, args.skill_fallback) if uses_bank else None) for s in all_seeds]
        groups = list(range(rank * P, (rank + 1) * P))  # global group indices of this rank
        seeds, picked = all_seeds[rank * P:(rank + 1) * P], all_picked[rank * P:(rank + 1) * P]  # (P,) each
        skill_prompts = [skills.teacher_prompt(k, task_prompt) for k in picked]

        with full_weights(model, teacher):  # sampling and teacher scoring run on full weights (no-op unless --fsdp)
            # 2. rollouts of all this rank's groups in one batch: the student under the plain prompt, except the
            #    off-policy ablation (the teacher plays) and skill-augmented GRPO (the student sees the skill)
            player = (teacher or model) if args.rollout_owner == "teacher" else model
            eps = play(player, tok, make_env, seeds, episode_rngs(args.seed, step, groups, G), args,
                       skill_prompts if (skill_in_student or args.rollout_owner == "teacher") else None)
            t_roll = time.time() - t0
            # The student always learns on the plain prompt, except in skill-augmented GRPO.
            student_eps = [rollout.reprompt(e, tok, task_prompt) for e in eps] if args.rollout_owner == "teacher" else eps

            # 3. rewards and group advantages
            rewards = torch.tensor([e.reward for e in eps], dtype=torch.float32).view(P, G)
            adv, frac_zero_var = losses.group_advantages(rewards)
            adv = adv.view(-1).to(device)  # (B,) one advantage per episode

            # 4. skills: one summary per task group (its G episodes side by side); skills finished by now (all
            #    ranks') enter every rank's bank in rank order
            if uses_bank:
                summarizer.submit([[episode_dict(e, args.env, task_prompt, oracle.get(e.task_id))
                                    for e in eps[g * G:(g + 1) * G]]
                                   for g in range(P)], step)
            new_skills = sum(all_gather_objects(summarizer.collect(wait_s=args.summarizer_wait), world), [])
            for k in new_skills:
                bank.add(k)

            # 5. teacher log-probs (and, for --sdl-estimator full, hidden states) of the student's exact tokens
            #    under skill + task, for the groups that have a skill
            distilled = [i for i in range(len(eps)) if picked[i // G] is not None] if use_sdl else []
            t_eps = [eps[i] if args.rollout_owner == "teacher" else rollout.reprompt(eps[i], tok, skill_prompts[i // G])
                     for i in distilled]
            hs_teacher, logp_teacher = teacher_logprobs(teacher or model, t_eps, distilled, pad_id, device, inv_t, args)

        # 6. loss over micro-batches, normalised by the global number of sampled tokens N
        num_tokens = sum(all_gather_objects(sum(sum(e.mask) for e in student_eps), world))
        opt.zero_grad(set_to_none=True)
        tally = {}  # this rank's metrics so far: token-weighted sums and maxima, see add_metrics
        params = [p for p in model.parameters() if p.requires_grad]
        sdl_grads = [torch.zeros_like(p) for p in params] if args.grad_norms else None  # grad L_SDL, kept apart
        logp_student = {}  # episode -> (n_i,) its sampled tokens' log-probs under the student (detached)
        for j in range(0, len(eps), args.micro_batch):
            rows = list(range(j, min(j + args.micro_batch, len(eps))))
            hs, lp, b = policy_logprobs(model, [student_eps[i] for i in rows], pad_id, device, inv_t, args)  # with grad
            sel = b["mask"] > 0  # (b, T)
            logp_student.update(zip(rows, lp.detach().split(sel.sum(1).tolist())))
            logp = torch.zeros(sel.shape, device=device).masked_scatter(sel, lp)  # (b, T) grid, grad flows to lp
            loss = torch.zeros((), device=device)
            if use_grpo:
                loss_grpo, mg = losses.grpo_loss(logp, b["logp_old"], adv[rows], b["mask"], args.eps_low,
                                                 args.eps_high, num_tokens=num_tokens)
                loss = loss + loss_grpo
                add_metrics(tally, mg, sel.sum().item())
                add_metrics(tally, {"loss_grpo": loss_grpo.item()}, 1)
            if use_sdl:  # also with no distilled row here: the loss stays connected to the graph
                loss_sdl, ms, n_distill = sdl_term(logp, hs, b, rows, logp_teacher, hs_teacher, model, teacher,
                                                   num_tokens, args)
                if sdl_grads is not None:  # the SDL term's own gradient, added to .grad after the GRPO norm
                    for acc, g in zip(sdl_grads, torch.autograd.grad(loss_sdl, params, retain_graph=True,
                                                                     allow_unused=True)):
                        acc += 0 if g is None else g
                else:
                    loss = loss + args.lam * loss_sdl
                add_metrics(tally, ms, n_distill)
                add_metrics(tally, {"loss_sdl": loss_sdl.item(), "n_distill": n_distill}, 1)
            # before backward: under FSDP the head is resharded after it
            ent = losses.token_entropy(hs.detach(), model.head_weight.detach().float(), args.chunk_size)  # no grad
            add_metrics(tally, {"entropy_sum": ent.sum().item()}, 1)
            loss.backward()  # on every rank for every micro-batch, even with no loss tokens (FSDP collectives)

        # 7. one gradient all-reduce, clip, step (--grad-norms: this rank's norms of the two terms, before it)
        if sdl_grads is not None:
            norms = {"grad_norm_grpo": torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item(),
                     "grad_norm_sdl": torch.linalg.vector_norm(torch.stack([g.norm() for g in sdl_grads])).item()}
            for p, g in zip(params, sdl_grads):
                p.grad.add_(g, alpha=args.lam)
        gnorm, skipped = optimizer_step(model, opt, world, args)

        # 8. teacher sync
        if teacher is not None and args.teacher == "dynamic" and (step + 1) % args.teacher_sync_every == 0:
            teacher.load_state_dict(model.state_dict())

        # 9. UCB: every selected skill gets its group's arm reward, or is released (no information), on every rank;
        #    the gap is taken against the student's log-probs (the off-policy ablation's logp_old is the teacher's)
        gap = {i: [d.tolist() for d in (logp_teacher[i] - logp_student[i]).split([e - s for s, e in eps[i].turn_spans])]
               for i in distilled}  # episode -> per turn, the gap at each sampled token
        arms = arm_rewards(rewards, adv.tolist(), gap, skill_in_student)  # (P,) float or None
        for g, r in enumerate(sum(all_gather_objects(arms, world), [])):
            if all_picked[g] is not None and fixed_skill is None:
                bank.update(all_picked[g], r) if r is not None else bank.release(all_picked[g])

        # 10. log, evaluate, checkpoint
        m = step_metrics(step, eps, rewards, frac_zero_var, adv.tolist(), gap, tally, use_grpo, use_sdl, summarizer, bank,
                         new_skills, world, args.max_turns)
        dt = time.time() - t0
        m.update({**(norms if sdl_grads is not None else {}), "grad_norm": gnorm, "skipped": skipped, "lr": args.lr, "tasks_eligible": n_elig, "step_time": dt,
                  "rollout_time": t_roll, "tokens_per_s": m["tokens"] / dt, "peak_mem_gb": peak_memory_gb(device)})
        last = step + 1 == args.steps
        if args.eval_n > 0 and (last or (args.eval_every and (step + 1) % args.eval_every == 0)):
            m.update(run_eval(model, tok, args, rank, world, device, step + 1))
        if rank == 0:
            write_logs(args, m, step, eps, student_eps, picked, bank, run)
            bar.set_postfix(reward=f"{m['reward']:.2f}", success=f"{m['success']:.2f}", step_s=f"{dt:.1f}")
        if last or (args.save_every and (step + 1) % args.save_every == 0):
            extra = {"summarizer": all_gather_objects(dict(summarizer.stats), world)}  # load_checkpoint returns it
            save_checkpoint(args.out, step + 1, model, tok, opt, bank, teacher, extra, args, rank)
        if world > 1:
            dist.barrier()

    summarizer.close(timeout=3.0)  # requests still in flight are abandoned (and counted), never waited out
    finish(args, rank, start, summarizer, run)
    return model


def finish(args, rank, start, summarizer, run):
    """End of run: what was abandoned, the evaluation table, the curves, the tracker."""
    if rank == 0 and summarizer.stats.get("abandoned"):
        print(f"summariser: {summarizer.stats['abandoned']} group(s) still in flight abandoned at exit", flush=True)
    if rank == 0 and args.eval_n > 0 and os.path.exists(os.path.join(args.out, "eval.md")):
        print(open(os.path.join(args.out, "eval.md")).read())
    if rank == 0 and args.steps > start:
        try:  # the learning curves; a plotting failure must not fail a finished run
            print("curves:", plot(os.path.join(args.out, "metrics.jsonl")))
        except (Exception, SystemExit) as e:
            print(f"no plot: {type(e).__name__}: {e}")
    if run is not None:  # the tracker gets the curves and the decoded episodes of episodes.jsonl, then closes
        import wandb
        png, eps = os.path.join(args.out, "metrics.png"), os.path.join(args.out, "episodes.jsonl")
        extra = {"curves": wandb.Image(png)} if os.path.exists(png) else {}
        if os.path.exists(eps):
            cols = ["step", "task_id", "reward", "success", "skill", "transcript"]
            extra["episodes"] = wandb.Table(columns=cols, data=[
                [e["step"], e["task_id"], e["reward"], e["success"], e["skill"], "\n\n".join(
                    f"[env] {o}\n\n[model] {r}" for o, r in zip(e["observations"], e["responses"]))]
                for e in map(json.loads, open(eps))])
        run.log(extra)
        run.finish()


def shutdown():
    """Destroy the process group once nothing built on it is left: FSDP's device mesh, sharded parameters and
    optimizer state freed after it (or at interpreter exit) sometimes abort the process in gloo's teardown
    ("terminate called without an active exception": 1 in 30 two-rank --fsdp exits on CPU)."""
    gc.collect()  # FSDP's modules sit in reference cycles: free them now, not at exit
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()  # returns the model, dropped here: the process group goes after it
    shutdown()
