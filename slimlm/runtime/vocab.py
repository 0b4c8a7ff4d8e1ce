"""Do two models share a tokenizer? Speculative, contrastive and proxy-tuned decoding add or compare
logits token id by token id, so a second model with another vocabulary would silently produce
garbage; this check turns that into one clear error.
"""

from __future__ import annotations

from typing import Any

from slimlm.errors import SlimlmError

SAMPLE_IDS = 64  # ids compared spread evenly over the vocabulary (plus the special tokens)


def _describe(name: str, tokenizer: Any) -> str:
    return f"{name} ({len(tokenizer):,} tokens, {type(tokenizer).__name__})"


def vocab_mismatch(a: Any, b: Any) -> str | None:
    """Why tokenizers ``a`` and ``b`` differ (size, special tokens or a sample of the id → token map), or None."""
    if len(a) != len(b):
        return f"sizes differ: {len(a):,} vs {len(b):,}"
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} differs: {getattr(a, attr, None)} vs {getattr(b, attr, None)}"
    n = len(a)
    ids = sorted({round(i * (n - 1) / (SAMPLE_IDS - 1)) for i in range(SAMPLE_IDS)})
    ta, tb = a.convert_ids_to_tokens(ids), b.convert_ids_to_tokens(ids)
    for i, x, y in zip(ids, ta, tb):
        if x != y:
            return f"token id {i} is {x!r} vs {y!r}"
    return None


def check_same_vocab(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raise SlimlmError naming both vocabularies when ``a`` and ``b`` are not the same tokenizer."""
    why = vocab_mismatch(a, b)
    if why is not None:
        raise SlimlmError(
            f"{_describe(name_b, b)} does not share the vocabulary of {_describe(name_a, a)}: {why}",
            "use a draft/amateur/proxy model made from the same tokenizer (e.g. a layer-dropped or distilled copy of the target)",
        )
