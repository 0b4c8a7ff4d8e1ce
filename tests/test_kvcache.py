"""Quantized KV cache: round trip bounds, packing, quality and memory through the cache on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.runtime import QuantizedKVCache, cached_perplexity, generate_with_kv, kv_bytes
from slimlm.runtime.kvcache import dequantize_kv, quantize_kv


@pytest.mark.parametrize("bits, group", [(8, 64), (4, 64), (4, 16)])
def test_kv_round_trip_within_half_step(bits: int, group: int) -> None:
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(bits + group))
    q, scale, lo = quantize_kv(x, bits, group)
    assert q.dtype == torch.uint8 and q.shape[-1] == 64 * bits // 8  # int4: two codes per byte
    assert scale.shape == (2, 3, 5, 64 // group) and scale.dtype == torch.float16
    err = (dequantize_kv((q, scale, lo), bits, group, torch.float32) - x).abs()
    step = scale.float().repeat_interleave(group, dim=-1)
    assert (err <= step / 2 + 2e-3 * x.abs().amax()).all()  # half a step, plus fp16 rounding of min


def test_kv_int4_known_answer() -> None:
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 16)  # min 0, max 15 → scale 1, exact
    state = quantize_kv(x, 4, 16)
    assert state[0].flatten().tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert torch.equal(dequantize_kv(state, 4, 16, torch.float32), x)


@pytest.mark.slow
def test_cache_perplexity_and_memory_on_real_text(default_lm, shakespeare_eval) -> None:
    model, tok = default_lm.model, default_lm.tokenizer
    ids = tok(shakespeare_eval[20000:22000], return_tensors="pt").input_ids[0][:160]
    fp = cached_perplexity(model, ids, prefix=96, chunk=64, kv_bits=None)
    i8 = cached_perplexity(model, ids, prefix=96, chunk=64, kv_bits=8)
    i4 = cached_perplexity(model, ids, prefix=96, chunk=64, kv_bits=4, group_size=32)
    assert fp["tokens"] == i8["tokens"] == 64
    assert abs(i8["perplexity"] / fp["perplexity"] - 1) < 0.01
    assert i4["perplexity"] / fp["perplexity"] < 1.15
    # fp32 holds 4 bytes/value; int8 g64 holds 1 + 4/64; int4 g32 holds 0.5 + 4/32
    assert i8["kv_bytes"] == pytest.approx(fp["kv_bytes"] * (1 + 4 / 64) / 4)
    assert i4["kv_bytes"] == pytest.approx(fp["kv_bytes"] * (0.5 + 4 / 32) / 4)


def test_generate_with_quantized_cache(default_lm) -> None:
    ids = default_lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out, cache = generate_with_kv(default_lm.model, ids, kv_bits=8, max_new_tokens=6)
    ref, _ = generate_with_kv(default_lm.model, ids, kv_bits=None, max_new_tokens=6)
    assert isinstance(cache, QuantizedKVCache) and out.shape[1] == ids.shape[1] + 6
    assert cache.get_seq_length() == ids.shape[1] + 5  # the last generated token is never fed back
    assert kv_bytes(cache) > 0
    assert torch.equal(out[:, : ids.shape[1] + 3], ref[:, : ids.shape[1] + 3])  # greedy start agrees


def test_bad_kv_settings(default_lm) -> None:
    with pytest.raises(SlimlmError, match="bits 3"):
        QuantizedKVCache(default_lm.model.config, bits=3)
    with pytest.raises(SlimlmError, match="group_size 48"):
        cached_perplexity(default_lm.model, torch.arange(10, 40), prefix=5, kv_bits=8, group_size=48)
    with pytest.raises(SlimlmError, match="prefix"):
        cached_perplexity(default_lm.model, torch.arange(10, 20), prefix=10, kv_bits=8)
