"""Quantized KV cache: keys and values stored as int8 or int4 codes inside generation.

Each cached vector of one head at one position is cut into groups of ``group_size`` channels of the
head dim (default: the whole head) and quantized asymmetrically, ``x ≈ q · scale + min`` with fp16
scale and min per group (KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750 quantizes values
per token like this; keys are quantized per token too here, so new tokens append without
re-quantizing old ones). int4 codes are packed two per byte along the head dim.

The layer subclasses ``transformers``' ``DynamicLayer`` and stores nothing in full precision: attention
always reads the dequantized cache, the current tokens included, so what is measured is what is
held. It does not use the built-in ``QuantizedCache``, whose int backends need optional packages
(quanto, HQQ) and which re-quantizes the whole cache per channel every ``residual_length`` tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from slimlm.errors import SlimlmError
from slimlm.models.compat import cache_kwargs

KV_BITS = (4, 8)

QState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8, scale fp16, min fp16


def quantize_kv(x: torch.Tensor, bits: int, group_size: int) -> QState:
    """x (B, H, T, D) → codes (B, H, T, D·bits/8) uint8, scale and min (B, H, T, D/group) fp16."""
    b, h, t, d = x.shape
    g = x.float().reshape(b, h, t, d // group_size, group_size)
    lo = g.amin(dim=-1)
    scale = ((g.amax(dim=-1) - lo) / (2**bits - 1)).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    lo = lo.to(torch.float16)
    q = torch.round((g - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 2**bits - 1).to(torch.uint8)
    q = q.reshape(b, h, t, d)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # two codes per byte along the head dim
    return q, scale, lo


def dequantize_kv(state: QState, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: (B, H, T, D) in ``dtype``."""
    q, scale, lo = state
    if bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    b, h, t, d = q.shape
    g = q.float().reshape(b, h, t, d // group_size, group_size)
    return (g * scale.float()[..., None] + lo.float()[..., None]).reshape(b, h, t, d).to(dtype)


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache, held as quantized codes only."""

    is_croppable = False

    def __init__(self, bits: int = 8, group_size: int | None = None) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.cumulative_length = 0
        self._k: QState | None = None
        self._v: QState | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            d = key_states.shape[-1]
            self.group_size = self.group_size or d
            if d % self.group_size or (self.bits == 4 and self.group_size % 2):
                raise SlimlmError(f"kv cache group_size {self.group_size} does not divide head dim {d}",
                                  "use a divisor of the head dim (even for int4)")
        self.cumulative_length += key_states.shape[-2]
        new_k = quantize_kv(key_states, self.bits, self.group_size)
        new_v = quantize_kv(value_states, self.bits, self.group_size)
        self._k = new_k if self._k is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(self._k, new_k))
        self._v = new_v if self._v is None else tuple(torch.cat([a, b], dim=2) for a, b in zip(self._v, new_v))
        dtype = key_states.dtype  # the attention's compute dtype (transformers ≥ 5.24 keeps no layer dtype)
        return (dequantize_kv(self._k, self.bits, self.group_size, dtype),
                dequantize_kv(self._v, self.bits, self.group_size, dtype))

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._k is not None:
            self._k = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self._k)
            self._v = tuple(t.index_select(0, beam_idx.to(t.device)) for t in self._v)

    def nbytes(self) -> int:
        held = (self._k or ()) + (self._v or ())
        return sum(t.numel() * t.element_size() for t in held)


class QuantizedKVCache(Cache):
    """A cache of :class:`QuantizedKVLayer`, one per decoder layer; pass through ``slimlm.models.compat.cache_kwargs``."""

    def __init__(self, config: Any, bits: int = 8, group_size: int | None = None) -> None:
        if bits not in KV_BITS:
            raise SlimlmError(f"kv cache bits {bits} are not supported", f"use one of {KV_BITS} (or None for full precision)")
        text = config.get_text_config(decoder=True)
        types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if types - {"full_attention"}:
            raise SlimlmError(f"kv cache quantization supports full-attention models only (this one has {sorted(types)})",
                              "use the default cache (kv_bits=None) for sliding-window models")
        super().__init__(layers=[QuantizedKVLayer(bits, group_size) for _ in range(text.num_hidden_layers)])


def make_cache(model: nn.Module, kv_bits: int | None, group_size: int | None = None) -> Cache:
    """A fresh cache for ``model``: full precision (``DynamicCache``) when ``kv_bits`` is None."""
    if kv_bits is None:
        return DynamicCache(config=model.config)
    return QuantizedKVCache(model.config, kv_bits, group_size)


def kv_bytes(cache: Cache) -> int:
    """Bytes of key/value state the cache actually holds (codes and scales for quantized layers)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, QuantizedKVLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return total


@torch.no_grad()
def generate_with_kv(model: nn.Module, ids: torch.Tensor, kv_bits: int | None = 8, *, group_size: int | None = None,
                     max_new_tokens: int = 32, **generate_kwargs: Any) -> tuple[torch.Tensor, Cache]:
    """Greedy ``model.generate`` with a (quantized) cache; returns (ids (B, T + new), the cache)."""
    cache = make_cache(model, kv_bits, group_size)
    ids = ids if ids.dim() == 2 else ids[None]
    out = model.generate(ids.to(next(model.parameters()).device), **cache_kwargs(model, cache),
                         max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
    return out, cache


@torch.no_grad()
def cached_perplexity(model: nn.Module, ids: torch.Tensor, *, prefix: int, chunk: int = 64, kv_bits: int | None = None,
                      group_size: int | None = None) -> dict[str, Any]:
    """Perplexity of ``ids[prefix:]`` (1-D ids) given ``ids[:prefix]``, scored ``chunk`` tokens at a time
    *through the cache*: every scored token attends only to cached (and, if ``kv_bits``, quantized) K/V."""
    if not 0 < prefix < len(ids):
        raise SlimlmError(f"prefix {prefix} must lie inside the {len(ids)} tokens scored", "use a shorter prefix or more text")
    device = next(model.parameters()).device
    cache = make_cache(model, kv_bits, group_size)
    ids = ids.to(device)
    last = model(input_ids=ids[None, :prefix], **cache_kwargs(model, cache), use_cache=True).logits[0, -1:].float()
    nll, count = 0.0, 0
    for start in range(prefix, len(ids), chunk):
        piece = ids[start : start + chunk]
        logits = model(input_ids=piece[None], **cache_kwargs(model, cache), use_cache=True).logits[0].float()
        pred = torch.cat([last, logits[:-1]])  # (len(piece), vocab): logit for each token of the piece
        nll += float(F.cross_entropy(pred, piece, reduction="sum"))
        count += piece.numel()
        last = logits[-1:]
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "prefix": prefix,
            "kv_bits": kv_bits, "kv_bytes": kv_bytes(cache), "context": len(ids)}
