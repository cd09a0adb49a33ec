"""The sampler's static-shape decode step (rollout.Column, decode_step) and its torch.compile: against the
block-by-block cache path, a full uncached forward, the eager step (same tokens, log-probs within 1e-5), and a
machine without a C++ compiler (one warning, then the eager step). The other test files decode eagerly
(conftest sets SKILL_SD_COMPILE=0); the compiled tests here switch it on and use the tiny model."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import model as M
import rollout as R
import train
from test_rollout import ScriptedEnv, recomputed_logp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def eos_tiny():
    """The tiny model with its eos logit raised, so turns end by eos as well as by the budget."""
    model, tok = M.load("tiny")
    text = "<|im_start|>user\nhello there, some text<|im_end|>\n<|im_start|>assistant\n"
    with torch.no_grad():
        h = model(torch.tensor([tok(text)["input_ids"]]), return_hidden=True)[0]  # (T, C)
        model.tok_emb.weight[tok.eos_token_id] += 0.7 * h.mean(0) / h.mean(0).norm()
    return model, tok


def rollouts(model, tok, **kw):
    """Multi-turn episodes that fork groups, end by eos and by budget, drop rows, grow and pack the cache."""
    gens = [torch.Generator().manual_seed(i) for i in range(9)]
    return R.rollout(model, tok, ScriptedEnv, [0, 1, 5], 3, 4, 12, temperature=0.9, top_p=0.95, generator=gens, **kw)


def test_static_step_equals_the_block_path_and_a_full_forward():
    """Decode steps through Columns (all T columns attended, unwritten ones masked, writes by index) give the logits
    of the KVCache block path (one column per block) and of an uncached forward over each row's real tokens,
    also with some rows riding along as padding, with twice the capacity, and attending to the written columns
    only (the eager sampler's S)."""
    model, _ = M.load("tiny")
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    steps = torch.tensor([[20, 21, 22], [23, 24, 25], [26, 27, 28], [29, 30, 31]])  # (N, B): step t's tokens
    active = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    caches = {"block": R.KVCache(model.config, 3, 128), "static": R.KVCache(model.config, 3, 128),
              "static, 256 columns": R.KVCache(model.config, 3, 256),
              "static, written columns only": R.KVCache(model.config, 3, 256)}
    out = {}
    with torch.no_grad():
        for name, cache in caches.items():
            out[name] = [R._forward_last(model, cache, *R._left_pad(prompts, 0, "cpu"))]
            cols = cache.columns()
            for t, (tok, act) in enumerate(zip(steps, active)):
                if name == "block":
                    out[name].append(R._forward_last(model, cache, tok[:, None], act[:, None]))
                else:  # the eager sampler attends to the columns written so far: cursor + t + 1
                    S = cache.cursor + t + 1 if name.endswith("only") else None
                    out[name].append(R.decode_step(model, cache, cols, tok, act, S))
            if name != "block":
                cache.cursor = int(cache.col)
        real = torch.cat([torch.ones(1, 3, dtype=torch.bool), active])  # a padding row's logits are never read
        for name in caches:
            assert torch.allclose(torch.stack(out[name])[real], torch.stack(out["block"])[real], atol=1e-5), name
            assert caches[name].cursor == caches["block"].cursor
            assert torch.equal(caches[name].next_pos, caches["block"].next_pos)
        for b in range(3):  # the real tokens of row b, uncached: each active step's logits are its last row
            seq = prompts[b] + [int(steps[t, b]) for t in range(len(steps)) if active[t, b]]
            full = model(torch.tensor([seq]))[0, len(prompts[b]) - 1:]  # (n + 1, V)
            got = torch.stack([out["static"][0][b]] + [out["static"][t + 1][b] for t in range(len(steps))
                                                       if active[t, b]])
            assert torch.allclose(got, full, atol=1e-5)


def packed_products(fn):
    """(fn(), how many products it ran on oneDNN-packed weights: model.linear's packed path)."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events())


@pytest.mark.slow  # compiles the tiny model's decode step once per process (about 10-40 s on 2 cores)
def test_compiled_decode_equals_eager(eos_tiny, monkeypatch):
    model, tok = eos_tiny
    monkeypatch.setattr(R, "COMPILE", False)
    eager, n_eager = packed_products(lambda: (rollouts(model, tok), rollouts(model, tok, max_len=70)))
    greedy = R.generate(model, tok, ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x" * 30], 16)
    monkeypatch.setattr(R, "COMPILE", True)
    torch._dynamo.utils.counters.clear()
    comp, n_comp = packed_products(lambda: (rollouts(model, tok), rollouts(model, tok, max_len=70)))
    assert n_comp == n_eager > 0  # the compiled graph's products use the packed weights too
    assert R._compiled not in (None, False), "the compiled step never ran"
    assert greedy == R.generate(model, tok, ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "x" * 30], 16)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    worst = 0.0
    for a, b in zip(eager[0] + eager[1], comp[0] + comp[1]):
        assert (a.tokens, a.mask, a.turn_spans, a.truncated) == (b.tokens, b.mask, b.turn_spans, b.truncated)
        worst = max([worst] + [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)])
    print(f"compiled vs eager: {sum(map(len, (e.turn_spans for e in comp[0])))} turns, max |dlogp| {worst:.1e}, "
          f"{frames} graph(s) compiled")
    assert worst < 1e-5
    assert any(e.truncated for e in comp[1]) and len({len(e.turn_spans) for e in comp[0]}) > 1
    # rows left the batch and the cache grew between turns: one dynamic-shape graph serves them all
    assert frames <= 1
    ours, ref = recomputed_logp(model, comp[0], tok.pad_token_id, 0.9)
    assert (ours - ref).abs().max() <= 1e-4  # the trainer's recomputation, as for the eager sampler


def test_a_failing_compile_warns_once_and_decodes_eagerly(eos_tiny, monkeypatch):
    """Any failure of torch.compile (here: it raises) gives exactly one warning and the eager step's results."""
    model, tok = eos_tiny
    monkeypatch.setattr(R, "COMPILE", False)
    eager = rollouts(model, tok)

    def broken(*a, **kw):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(R, "COMPILE", True)
    monkeypatch.setattr(R, "_compiled", None)
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = rollouts(model, tok), rollouts(model, tok)
    msgs = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and R._compiled is False
    assert again[1] == eager  # the first call's first turn attended to all cache columns: equal up to rounding
    assert [e.tokens for e in again[0]] == [e.tokens for e in eager]
    assert max(abs(x - y) for a, b in zip(again[0], eager) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


NO_CXX = textwrap.dedent("""
    import json, sys, warnings
    import torch
    import envs, model as M, rollout as R
    model, tok = M.load("tiny")
    run = lambda: [e.tokens for e in R.rollout(model, tok, lambda: envs.make_env("sokoban", max_turns=2),
                                               [1, 2], 2, 2, 8, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = run(), run()
    R.COMPILE = False
    print(json.dumps({"warnings": [str(w.message) for w in caught if "torch.compile failed" in str(w.message)],
                      "same": a == b == run(), "compiled": R._compiled}))
""")


@pytest.mark.slow  # a fresh process tries to compile (about 10-30 s)
def test_a_machine_without_a_compiler_falls_back_with_one_warning(tmp_path):
    """CXX names no compiler and the inductor cache is empty, so the C++ build really fails."""
    env = {**os.environ, "SKILL_SD_COMPILE": "1", "CXX": str(tmp_path / "no-such-g++"), "PYTHONPATH": ROOT,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    r = subprocess.run([sys.executable, "-c", NO_CXX], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and out["same"] and out["compiled"] is False, out


def test_no_compile_flag(tmp_path, monkeypatch, capsys):
    """train.py --no-compile never compiles (the step stays None) and prints no compile time."""
    monkeypatch.setattr(R, "COMPILE", True)
    monkeypatch.setattr(R, "_compiled", None)
    train.main(["--model", "tiny", "--device", "cpu", "--prompts-per-step", "1", "--group-size", "2", "--max-turns",
                "1", "--max-new-tokens", "4", "--micro-batch", "2", "--eval-n", "1", "--steps", "1", "--no-compile",
                "--out", str(tmp_path / "run")])
    assert R.COMPILE is False and R._compiled is None and "compiled the decode step" not in capsys.readouterr().out


def test_auto_compiles_and_false_never_does(eos_tiny, monkeypatch):
    """The default ("auto") compiles the decode step, on CPU too (faster there: bench_rollout); False never does."""
    model, tok = eos_tiny
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)  # "compiles" to itself
    for mode, calls in (("auto", [R._run_layers]), (False, [])):
        compiled.clear()
        monkeypatch.setattr(R, "COMPILE", mode)
        monkeypatch.setattr(R, "_compiled", None)
        R.generate(model, tok, ["hi", "hello"], 4, min_new_tokens=4)
        assert compiled == calls and R._compiled is (calls[0] if calls else None), mode


def test_packed_weights_equal_plain_products_and_never_go_stale(eos_tiny, monkeypatch):
    """The sampler's oneDNN-packed weights (model.packed_weights, CPU): inside a rollout every Linear weight and the
    head are packed and used, and the episodes equal those of the plain F.linear path (tokens; log-probs within
    1e-5); outside nothing is packed, products with grad are F.linear's exactly, and a weight changed in place between
    two rollouts (an optimizer step) is what the next rollout samples from."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: the sampler uses F.linear")
    model, tok = M.load("tiny")  # a copy of its own: this test changes a weight
    model.load_state_dict(eos_tiny[0].state_dict())
    weights = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weights.add(model.head_weight.data_ptr())
    packed_during, used = [], set()

    @contextlib.contextmanager
    def spy(m):
        with M.packed_weights(m):
            packed_during.append(set(getattr(M._local, "packed", None) or {}))
            yield
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, p, *a: (used.add(id(p)), real(x, p, *a))[1])
    monkeypatch.setattr(R, "packed_weights", spy)
    packed = rollouts(model, tok)
    assert packed_during == [weights] and not getattr(M._local, "packed", None)
    assert len(used) == len(weights)  # every packed copy did the products of its weight
    with M.packed_weights(model):
        x, w = torch.randn(3, model.config.hidden_size), model.layers[0].mlp.w_gate_up.weight
        with torch.no_grad():
            assert torch.allclose(M.linear(x, w), F.linear(x, w), atol=1e-5)
            used.clear()
            M.linear(torch.randn(300, x.shape[1]), w)  # a prefill block's rows: packed too
            assert used == {id(M._local.packed[w.data_ptr()])}
        assert torch.equal(M.linear(x, w), F.linear(x, w))  # with grad: the trainer's product
    with monkeypatch.context() as m:
        m.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # packed_weights packs nothing
        plain = rollouts(model, tok)
        with torch.no_grad():  # an optimizer step's in-place update
            model.layers[0].mlp.w_down.weight.mul_(-3.0)
        changed_plain = rollouts(model, tok)
    assert packed_during == [weights, set(), set()]
    for a, b in zip(packed, plain):
        assert (a.tokens, a.mask, a.turn_spans) == (b.tokens, b.mask, b.turn_spans)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    changed = rollouts(model, tok)  # packed again, from the changed weights
    assert [e.tokens for e in changed] == [e.tokens for e in changed_plain] != [e.tokens for e in packed]


def test_the_eager_step_attends_to_the_written_columns_only(eos_tiny, monkeypatch):
    """Every decode step of a multi-turn rollout on CPU attends to S = the column it writes + 1, within the cache's
    capacity T (compiled on CUDA it would get None: all T)."""
    model, tok = eos_tiny
    monkeypatch.setattr(R, "COMPILE", False)
    seen, real = [], R.decode_step

    def spy(model, cache, cols, tok, active, S=None):
        seen.append((S, int(cache.col) + 1, cache.valid.shape[1]))
        return real(model, cache, cols, tok, active, S)
    monkeypatch.setattr(R, "decode_step", spy)
    rollouts(model, tok)
    assert seen and all(S == written <= T for S, written, T in seen)
    assert len({T for _, _, T in seen}) > 1 and min(S for S, _, _ in seen) < min(T for _, _, T in seen)


def test_a_worker_threads_packing_never_reaches_the_main_thread(eos_tiny):
    """A generate() in a worker thread (an asynchronous "self" summariser) packs its own copies: the main thread,
    after an optimizer step, packs the changed weights instead of reusing the worker's."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: the sampler uses F.linear")
    model, _ = M.load("tiny")
    model.load_state_dict(eos_tiny[0].state_dict())
    opened, done = threading.Event(), threading.Event()

    def worker():
        with M.packed_weights(model):
            opened.set()
            done.wait(60)
    th = threading.Thread(target=worker)
    th.start()
    try:
        assert opened.wait(60)
        w = model.layers[0].mlp.w_down.weight
        with torch.no_grad():
            w.mul_(-3.0)  # the step, while the worker's packing is open
            with M.packed_weights(model):
                x = torch.randn(2, w.shape[1])
                assert torch.allclose(M.linear(x, w), F.linear(x, w), atol=1e-5)
    finally:
        done.set()
        th.join()
