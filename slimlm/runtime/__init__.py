"""Inference-time machinery: generation loops and caches (quantized KV cache)."""

from slimlm.runtime.kvcache import QuantizedKVCache, cached_perplexity, generate_with_kv, kv_bytes, make_cache

__all__ = ["QuantizedKVCache", "cached_perplexity", "generate_with_kv", "kv_bytes", "make_cache"]
