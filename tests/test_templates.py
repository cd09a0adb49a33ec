"""The paper's model at first contact: the sampler against the published Qwen3 chat templates (tests/data/, with
their sources in tests/data/README.md) and a tokenizer built here with the special tokens they need (no download).

- Qwen3-4B-Instruct-2507: every episode's ids equal transformers' `apply_chat_template` of the same conversation
  (Sokoban prompt, sampled turns, observations), and `train.py` runs with it.
- Qwen3 thinking models: the template renders a `<think>` block in the last assistant turn only and drops it from
  earlier turns once a turn is appended (shown here with `apply_chat_template`), so a sampler that appends token
  ids can never equal it: `template_pieces`, `rollout` and `train.py` refuse it with one line."""
import os

import pytest
import torch

import envs
import model as M
import rollout as R
import train
from eval import main as eval_main
from warmup import main as warmup_main

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen3's pad, turn start, eos (special tokens)
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # Qwen3's added tokens that are not special


def qwen3_tokenizer(template):
    """Byte-level, no merges (one tokenization per text, so decoded turns re-encode to the sampled ids), with
    Qwen3's special and added tokens and the published template `template` (a file in tests/data)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = M.byte_tokenizer().backend_tokenizer  # the 256 bytes + <|endoftext|>, <|im_start|>, <|im_end|>
    assert [tok.id_to_token(256 + i) for i in range(3)] == SPECIAL
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in ADDED])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=open(os.path.join(DATA, template)).read())


def qwen3_shaped_tiny(tok):
    """A random tiny decoder with Qwen3's features (q/k norm) over `tok`'s vocabulary, its eos made likely so that
    turns end by eos as well as by the token budget."""
    model = M.Transformer(M.Config(vocab_size=len(tok), qk_norm=True, arch="qwen3"))
    M.init_weights(model, 0)
    with torch.no_grad():
        model.tok_emb.weight[tok.eos_token_id] *= 12.0
    return model


class AsciiOnly(torch.nn.Module):
    """The model with a -1e4 logit bias on every byte >= 128: a random model's bytes are rarely valid UTF-8, and a
    decoded U+FFFD re-encodes to other ids, a property of byte tokenizers, not of the template under test. Special
    and added tokens stay allowed, so turns do hold <|im_start|>, <think> etc. (bias = an extra hidden column of 1s)."""

    def __init__(self, model, tok):
        super().__init__()
        self.inner, self.config = model, model.config
        bias = torch.zeros(len(tok), 1)
        bias[128:256] = -1e4
        self.head_weight = torch.cat([model.head_weight.detach(), bias], 1)  # (V, C + 1)

    def forward(self, idx, return_hidden=False, **kw):
        h = self.inner(idx, return_hidden=True, **kw)  # (B, W, C)
        return torch.cat([h, torch.ones_like(h[..., :1])], -1)


def conversation(ep, system):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": ep.observations[0]}]
    for i, text in enumerate(ep.responses):
        msgs.append({"role": "assistant", "content": text})
        if i + 1 < len(ep.responses):
            msgs.append({"role": "user", "content": ep.observations[i + 1]})
    return msgs


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_qwen3_instruct_2507_episodes_equal_apply_chat_template():
    tok = qwen3_tokenizer("qwen3_instruct_2507.jinja")
    model = AsciiOnly(qwen3_shaped_tiny(tok), tok)
    make_env = lambda: envs.make_env("sokoban", max_turns=4)  # noqa: E731
    seeds = envs.task_set("train", 4, env="sokoban")
    eps = R.rollout(model, tok, make_env, seeds, 3, 4, 10, temperature=1.0,
                    generator=torch.Generator().manual_seed(0))
    system, eos = make_env().task_prompt(), tok.eos_token_id
    for ep in eps:
        ref = tok.apply_chat_template(conversation(ep, system), tokenize=True, return_dict=True)["input_ids"]
        n = len(ep.tokens)
        assert ep.tokens == ref[:n]  # prompt, every sampled turn and every wrapped observation, id for id
        # after the last turn the template closes it: "\n" after a sampled eos, eos + "\n" after a cut turn
        assert ref[n:] == ([] if ep.tokens[-1] == eos else [eos]) + ids(tok, "\n")
    sampled = [t for ep in eps for t, m in zip(ep.tokens, ep.mask) if m]
    assert {tok.convert_tokens_to_ids(t) for t in ["<|im_start|>", "<think>"]} <= set(sampled)  # specials in turns
    ends = [ep.tokens[e - 1] == eos for ep in eps for _, e in ep.turn_spans]
    assert any(ends) and not all(ends) and max(len(ep.responses) for ep in eps) >= 3  # both stops, 3+ turns


def test_qwen3_thinking_template_drops_earlier_think_blocks_and_is_refused():
    tok = qwen3_tokenizer("qwen3.jinja")
    turn = {"role": "assistant", "content": "<think>\nthe box is left of me\n</think>\n\n<action>Left</action>"}
    start = [{"role": "system", "content": "rules"}, {"role": "user", "content": "map 1"}, turn]
    last = tok.apply_chat_template(start, tokenize=False)
    appended = tok.apply_chat_template(start + [{"role": "user", "content": "map 2"}], tokenize=False,
                                       add_generation_prompt=True)
    assert "the box is left of me" in last and "the box is left of me" not in appended  # dropped once appended
    assert not appended.startswith(last)  # so no token stream that only appends can equal the template's
    with pytest.raises(ValueError, match="Qwen/Qwen3-4B: unsupported chat template: it writes a <think> block"):
        R.template_pieces(tok, "Qwen/Qwen3-4B")
    with pytest.raises(ValueError, match="dropping it from earlier ones once a turn is appended"):
        R.rollout(qwen3_shaped_tiny(tok), tok, lambda: envs.make_env("sokoban"), [0], 2, 2, 4)


def test_train_runs_qwen3_instruct_2507_and_refuses_a_thinking_template(tmp_path, capsys):
    flags = ["--device", "cpu", "--prompts-per-step", "2", "--group-size", "2", "--max-turns", "2",
             "--max-new-tokens", "6", "--micro-batch", "2", "--eval-n", "2", "--train-tasks", "2", "--steps", "1"]
    for template in ("qwen3_instruct_2507.jinja", "qwen3.jinja"):
        tok = qwen3_tokenizer(template)
        M.save(qwen3_shaped_tiny(tok), tok, str(tmp_path / template))
    train.main(flags + ["--model", str(tmp_path / "qwen3_instruct_2507.jinja"), "--out", str(tmp_path / "a")])
    assert os.path.exists(tmp_path / "a" / "eval.json")
    thinking = str(tmp_path / "qwen3.jinja")
    with pytest.raises(SystemExit) as e:
        train.main(flags + ["--model", thinking, "--out", str(tmp_path / "b")])
    msg = str(e.value.code)
    assert msg.startswith(f"error: {thinking}: unsupported chat template") and "<think>" in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "b" / "metrics.jsonl")  # refused before any step
    for main, argv in ((eval_main, ["--model", thinking, "--n", "2", "--out", str(tmp_path / "c")]),
                       (warmup_main, ["--model", thinking, "--steps", "1", "--out", str(tmp_path / "d")])):
        with pytest.raises(SystemExit) as e:  # eval.py and warmup.py refuse it the same way, before any work
            main(argv)
        assert str(e.value.code).startswith(f"error: {thinking}: unsupported chat template")
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "d")
