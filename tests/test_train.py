"""End-to-end tests of train.py on the tiny model: every method and ablation, resume, torchrun, distillation."""
import json
import os
import subprocess
import sys

import pytest
import torch

import envs
import losses
import model as M
import rollout as R
import skills as S
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny", "--device", "cpu", "--prompts-per-step", "2", "--group-size", "2", "--max-turns", "2",
        "--max-new-tokens", "6", "--micro-batch", "2", "--eval-n", "2", "--lr", "1e-3", "--train-tasks", "2"]
TIMING = {"step_time", "rollout_time", "tokens_per_s", "peak_mem_gb"}


def run(tmp, *extra, steps=3):
    out = str(tmp)
    train.main(TINY + ["--steps", str(steps), "--out", out, *extra])
    return out


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def weights(folder):
    return M.load(folder)[0].state_dict()


def latest(out):
    return os.path.join(out, open(os.path.join(out, "latest")).read().strip())


VARIANTS = {
    "skill-sd": [],
    "grpo": ["--method", "grpo"],
    "opd": ["--method", "opd"],
    "skill-aug-grpo": ["--method", "skill-aug-grpo"],
    "frozen-teacher": ["--teacher", "frozen"],
    "teacher-sync-2": ["--teacher-sync-every", "2"],
    "off-policy-dynamic": ["--rollout-owner", "teacher"],
    "off-policy-frozen": ["--rollout-owner", "teacher", "--teacher", "frozen"],
    "self-summarizer": ["--summarizer", "self"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_method_and_ablation_runs(tmp_path, name):
    out = run(tmp_path, *VARIANTS[name])
    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(m["reward"])) for m in metrics)
    assert "eval_acc" in metrics[-1]
    assert len(read_jsonl(os.path.join(out, "episodes.jsonl"))) == 3 * 2
    assert S.SkillBank.load(os.path.join(out, "skills.json")).metrics()["size"] >= 0
    assert os.path.exists(os.path.join(out, "eval.md")) and os.path.exists(os.path.join(out, "eval.json"))
    ckpt = latest(out)
    assert os.path.exists(os.path.join(ckpt, "trainer.pt"))
    if name in ("skill-sd", "opd", "frozen-teacher"):  # 2 tasks: by step 2 each has a skill of its own
        assert metrics[-1]["distill_frac"] > 0 and metrics[-1]["loss_sdl"] is not None


@pytest.mark.parametrize("argv, msg", [
    (["--group-size", "1"], "group-size"),
    (["--method", "grpo", "--teacher", "frozen"], "only apply"),
    (["--method", "grpo", "--rollout-owner", "teacher"], "needs a teacher"),
    (["--summarizer", "bogus"], "summar"),
    (["--top-p", "0"], "top-p"),
])
def test_bad_flags_give_clear_errors(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_unknown_model_and_env_give_clear_errors(tmp_path):
    for extra, msg in [(["--model", str(tmp_path / "nope")], "error"), (["--env", "chess"], "error")]:
        with pytest.raises(SystemExit) as e:
            train.main(TINY + ["--steps", "1", "--out", str(tmp_path / "o"), *extra])
        assert msg in str(e.value.code)


def test_resume_is_exact(tmp_path):
    a = run(tmp_path / "a", "--eval-every", "2", steps=4)
    b = run(tmp_path / "b", "--eval-every", "2", steps=2)
    run(tmp_path / "b", "--eval-every", "2", "--resume", steps=4)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    ma, mb = read_jsonl(os.path.join(a, "metrics.jsonl")), read_jsonl(os.path.join(b, "metrics.jsonl"))
    assert len(mb) == 4 and strip(ma) == strip(mb)
    wa, wb = weights(latest(a)), weights(latest(b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_jsonl(os.path.join(a, "episodes.jsonl")) == read_jsonl(os.path.join(b, "episodes.jsonl"))


def test_recorded_episodes_rescore_to_their_sampler_logprobs(tmp_path):
    out = run(tmp_path, "--save-every", "1", "--keep-checkpoints", "10", "--log-episodes", "4", "--temperature", "0.7")
    worst = 0.0
    for ep in read_jsonl(os.path.join(out, "episodes.jsonl")):
        s = ep["step"]  # sampled by the weights before update s: the initial model, or checkpoint s - 1
        m = M.load("tiny")[0] if s == 1 else M.load(os.path.join(out, f"ckpt-{s - 1:06d}"))[0]
        idx = torch.tensor([ep["tokens"]])
        with torch.no_grad():
            logp = torch.log_softmax(m(idx)[0, :-1].double() / 0.7, -1).gather(-1, idx[0, 1:, None])[:, 0]
        mask = torch.tensor(ep["mask"][1:], dtype=torch.bool)
        assert mask.any()
        worst = max(worst, (logp[mask] - torch.tensor(ep["logprobs"][1:], dtype=torch.float64)[mask]).abs().max().item())
    assert worst <= 1e-4, worst


def kl_on_fixed_batch(student, teacher, tok, skill):
    """Full-vocabulary KL(student under the plain prompt || teacher under the skill prompt) on fixed episodes."""
    env = envs.make_env("sokoban", max_turns=2)
    base = M.load("tiny")[0].eval()
    with torch.no_grad():
        eps = R.rollout(base, tok, lambda: envs.make_env("sokoban", max_turns=2), envs.task_set("train", 2), 2, 2, 6,
                        generator=torch.Generator().manual_seed(123))
    s = R.batch_tensors(eps, tok.pad_token_id, "cpu")
    t = R.batch_tensors([R.reprompt(e, tok, S.teacher_prompt(skill, env.task_prompt())) for e in eps],
                        tok.pad_token_id, "cpu")
    with torch.no_grad():
        hs = student(s["idx"], return_hidden=True)[s["mask"] > 0]
        ht = teacher(t["idx"], return_hidden=True)[t["mask"] > 0]
        return losses.reverse_kl_full(hs, ht, student.head_weight, 256, weight_teacher=teacher.head_weight).mean().item()


@pytest.mark.slow
class NoisyReward(envs.Sokoban):
    """Sokoban whose reward also depends on the answer's characters, so the tiny model's groups have spread."""
    def step(self, text):
        obs, reward, done, info = super().step(text)
        return obs, reward + sum(map(ord, text)) % 7 / 7, done, info


@pytest.mark.parametrize("method", ["skill-sd", "grpo", "opd", "skill-aug-grpo"])
def test_a_training_step_is_the_same_with_and_without_the_shared_prefix(tmp_path, monkeypatch, method):
    """One train.py step per method, groups of 4 in micro-batches of 3 (every group split), teacher behind a skill
    prompt: the losses and every parameter gradient of --shared-prefix equal --no-shared-prefix's within 1e-5
    relative. (2 ranks = 1 process is test_torchrun_two_ranks_match_one_process, shared prefix on.)"""
    monkeypatch.setattr(envs, "make_env", lambda name, **kw: NoisyReward(**{**envs.ENVS[name], **kw}))
    skill = tmp_path / "skill.json"
    skill.write_text(json.dumps({"success_analysis": "Push the box up.", "mistake_analysis": "Bumped walls.",
                                 "golden_workflow": "<action>Up || Left</action>"}))
    grads, optimizer_step = [], train.optimizer_step

    def spy(model, opt, world, args):
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return optimizer_step(model, opt, world, args)

    monkeypatch.setattr(train, "optimizer_step", spy)
    # sharpened x8 so the skill prompt moves the teacher (gap ~0.1 nats, not ~1e-3): the SDL gradient is a
    # difference of student and teacher log-probs, and fp32 rounding of nearly equal ones would dominate it
    m, tok = M.load("tiny")
    with torch.no_grad():
        for q in m.parameters():
            q.mul_(8.0 if q.dim() == 2 else 1.0)
    M.save(m, tok, str(tmp_path / "sharp"))
    common = ["--model", str(tmp_path / "sharp"), "--method", method, "--skill-file", str(skill), "--group-size", "4",
              "--micro-batch", "3",
              "--eval-n", "0", "--temperature", "1"]
    shared = read_jsonl(os.path.join(run(tmp_path / "shared", *common, "--shared-prefix", steps=1), "metrics.jsonl"))
    plain = read_jsonl(os.path.join(run(tmp_path / "plain", *common, "--no-shared-prefix", steps=1), "metrics.jsonl"))
    g_shared, g_plain = grads
    assert shared[0]["reward"] == plain[0]["reward"] and shared[0]["frac_zero_var"] < 1  # same episodes, with spread
    # loss_grpo sums advantages x ratios of order 1 that cancel within a group (its value is ~1e-7), and the gap
    # is a difference of log-probs of order 1: both to 1e-5 absolute; loss_sdl to 1e-5 relative
    for k, scale in (("loss_grpo", 1.0), ("loss_sdl", None), ("gap", 1.0)):
        a, b = shared[0][k], plain[0][k]
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5 * (scale or abs(b))), (k, a, b)
    assert len(g_plain) == len(list(M.load("tiny")[0].parameters())) and g_shared.keys() == g_plain.keys()
    assert max(g.abs().max().item() for g in g_plain.values()) > 0  # the step has a gradient to compare
    for n, g in g_plain.items():
        assert (g_shared[n] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-12, n


def test_distillation_reaches_the_student(tmp_path):
    # The random tiny model is nearly uniform, so a skill prompt barely moves it (KL ~1e-5, below Adam's noise
    # floor). Sharpening its weights x8 makes the teacher's skill prompt matter (KL ~0.27 nats/token).
    m, tok = M.load("tiny")
    with torch.no_grad():
        for q in m.parameters():
            if q.dim() == 2:
                q.mul_(8.0)
    folder = str(tmp_path / "sharp")
    M.save(m, tok, folder)
    skill = {"success_analysis": "Pushing the box Right then Up solved it.", "mistake_analysis": "Walls were bumped.",
             "golden_workflow": "<action>Right || Up</action>"}
    path = tmp_path / "skill.json"
    path.write_text(json.dumps(skill))
    sk = S.parse_skill(json.dumps(skill))
    common = ["--model", folder, "--method", "opd", "--teacher", "frozen", "--skill-file", str(path), "--eval-n", "0",
              "--group-size", "8", "--max-new-tokens", "16", "--micro-batch", "16", "--lr", "3e-4", "--temperature", "1"]
    teacher = M.load(folder)[0].eval()
    before = kl_on_fixed_batch(M.load(folder)[0].eval(), teacher, tok, sk)
    on = run(tmp_path / "on", *common, "--lam", "1", steps=20)
    off = run(tmp_path / "off", *common, "--lam", "0", steps=20)
    after_on = kl_on_fixed_batch(M.load(latest(on))[0].eval(), teacher, tok, sk)
    after_off = kl_on_fixed_batch(M.load(latest(off))[0].eval(), teacher, tok, sk)
    assert before > 0.05
    assert after_on < 0.85 * before, (before, after_on)
    assert abs(after_off - before) <= 1e-6 * max(1.0, before), (before, after_off)


DIST = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train
model = train.main(sys.argv[1:])
if "--fsdp" not in sys.argv:  # a sharded model's weights are checked through its checkpoint
    torch.save(model.state_dict(), sys.argv[sys.argv.index("--out") + 1] + "/rank" + os.environ.get("RANK", "0") + ".pt")
del model
train.shutdown()  # as train.py's __main__: the process group goes after the model
"""


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path):
    """2 gloo ranks, replicated and FSDP-sharded, against one process over the same episodes and seeds; and 2
    ranks with --no-shared-prefix against 2 ranks with it (the default)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DIST.format(root=ROOT))
    args = TINY + ["--steps", "2", "--eval-n", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, str(driver)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", str(driver)],
            "fsdp": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29532",
                     str(driver), "--fsdp"],
            "two-plain": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
                          str(driver), "--no-shared-prefix"]}
    for name, cmd in runs.items():
        r = subprocess.run(cmd + args + ["--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    w0, w1, w = (torch.load(tmp_path / d / f) for d, f in [("two", "rank0.pt"), ("two", "rank1.pt"), ("one", "rank0.pt")])
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the replicas never drift apart
    assert max((w0[k] - w[k]).abs().max().item() for k in w) <= 1e-5
    wp = torch.load(tmp_path / "two-plain" / "rank0.pt")
    assert max((w0[k] - wp[k]).abs().max().item() for k in w) <= 1e-5  # shared prefix = plain, on 2 ranks too
    ws = weights(latest(tmp_path / "fsdp"))  # sharded run: the gathered checkpoint rank 0 wrote
    assert max((ws[k] - w[k]).abs().max().item() for k in w) <= 1e-5
    init = M.load("tiny")[0].state_dict()
    assert max((w[k] - init[k]).abs().max().item() for k in w) > 1e-4  # and training did move the weights


@pytest.mark.slow
def test_torchrun_resume_keeps_every_counter(tmp_path):
    """2 ranks, killed after step 2 and resumed, against 2 ranks uninterrupted: every metric (bank and summariser
    counters included, each rank's summariser counters being saved) is equal."""
    driver = tmp_path / "driver.py"
    driver.write_text(DIST.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", str(driver)]
    args = TINY + ["--prompts-per-step", "4", "--train-tasks", "3", "--eval-n", "0"]
    for out, extra in [("a", ["--steps", "3"]), ("b", ["--steps", "2"]), ("b", ["--steps", "3", "--resume"])]:
        r = subprocess.run(cmd + args + extra + ["--out", str(tmp_path / out)], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, (out, r.stderr[-3000:])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    ma, mb = (read_jsonl(tmp_path / d / "metrics.jsonl") for d in "ab")
    assert len(mb) == 3 and strip(ma) == strip(mb)
    assert mb[-1]["summarizer"]["groups"] == 3 * 4 and mb[-1]["skills"]["selects"] == 3 * 4
