"""Sampling, stop strings, streaming, chat template, bad input, and the `slimlm generate` / `slimlm chat` commands."""

from __future__ import annotations

import io
import sys

import pytest
import torch

import slimlm
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig, processed_probs, sample


@pytest.fixture(scope="module")
def eng() -> Engine:
    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(8, lm.info.n_layers)))
    return Engine(lm, max_seq=256)


def test_processed_probs_truncations() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    same = lambda cfg, want: torch.testing.assert_close(processed_probs(logits, cfg), torch.tensor([want]))  # noqa: E731
    same(GenConfig(temperature=1.0), [0.5, 0.25, 0.15, 0.1])
    same(GenConfig(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0])
    same(GenConfig(temperature=1.0, top_p=0.7), [2 / 3, 1 / 3, 0, 0])  # 0.5 < 0.7 ≤ 0.75: two tokens
    same(GenConfig(temperature=1.0, min_p=0.4), [2 / 3, 1 / 3, 0, 0])  # keep p ≥ 0.2
    same(GenConfig(), [1.0, 0, 0, 0])  # greedy: one-hot
    hot = processed_probs(logits, GenConfig(temperature=0.5))
    assert hot[0, 0] > 0.5 and torch.isclose(hot.sum(), torch.tensor(1.0))
    pen = processed_probs(logits, GenConfig(temperature=1.0, repetition_penalty=100.0), history=torch.tensor([[0]]))
    assert pen[0, 0] < 0.5  # the seen token (negative logit) is multiplied by the penalty: less likely


def test_sampling_is_seeded_and_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(4000, 3)
    cfg = GenConfig(temperature=1.0)
    draws = sample(logits, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(draws, sample(logits, cfg, torch.Generator().manual_seed(0)))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(max_new_tokens=0), dict(stop=[""])])
def test_out_of_range_options(bad) -> None:
    with pytest.raises(SlimlmError):
        GenConfig(**bad).validate()


def test_stream_equals_generate_and_stop_strings(eng) -> None:
    cfg = GenConfig(max_new_tokens=30, stop_at_eos=False)
    full = eng.generate("Once upon a time", cfg)
    assert "".join(eng.stream("Once upon a time", cfg)) == full.text
    word = full.text.split()[3]
    cut = eng.generate("Once upon a time", GenConfig(max_new_tokens=30, stop_at_eos=False, stop=[word]))
    assert cut.finish_reason == "stop" and word not in cut.text and full.text.startswith(cut.text)
    streamed = "".join(eng.stream("Once upon a time", GenConfig(max_new_tokens=30, stop_at_eos=False, stop=[word])))
    assert streamed == cut.text
    seen: list[str] = []
    eng.generate("Once upon a time", cfg, on_token=lambda t, d: seen.append(d))
    assert "".join(seen) == full.text


def test_seeded_sampling_repeats_and_batch_matches_single(eng) -> None:
    cfg = GenConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, stop_at_eos=False)
    a, b = eng.generate("The sea", cfg), eng.generate("The sea", cfg)
    assert a.tokens == b.tokens
    greedy = GenConfig(max_new_tokens=8, stop_at_eos=False, repetition_penalty=1.3)
    rows = eng.generate(["The sea", "A long prompt about mountains and rivers"], greedy)
    assert [r.tokens for r in rows] == [eng.generate(p, greedy).tokens for p in ["The sea", "A long prompt about mountains and rivers"]]


def test_chat_template_and_eos(eng) -> None:
    ids = eng.encode("What is the capital of France?", chat=True)
    text = eng.tokenizer.decode(ids)
    assert "<|im_start|>user" in text and text.rstrip().endswith("assistant")
    res = eng.generate("What is the capital of France?", GenConfig(max_new_tokens=60), chat=True)
    assert res.finish_reason in {"eos", "length"} and res.text


def test_prompt_longer_than_context(eng) -> None:
    with pytest.raises(SlimlmError, match="context"):
        eng.generate(list(range(1, 300)), GenConfig(max_new_tokens=2))


def test_python_api(default_lm) -> None:
    text = slimlm.generate(default_lm, "The capital of France is", max_new_tokens=5)
    assert isinstance(text, str) and text


def test_cli_generate_and_chat(capsys, monkeypatch) -> None:
    assert main(["generate", "default", "The capital of France is", "--max-new-tokens", "6", "--stream", "--stop", "zzz"]) in (0, None)
    out = capsys.readouterr()
    assert out.out.strip() and "tok/s" in out.err
    assert main(["generate", "default", "hi", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\nWhat did I just say?\n/exit\n"))
    assert main(["chat", "default", "--max-new-tokens", "8"]) in (0, None)
    out = capsys.readouterr()
    assert out.out.count("assistant>") == 2 and out.err.count("tok/s") == 2
