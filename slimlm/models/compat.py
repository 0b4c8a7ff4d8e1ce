"""transformers version differences in one place, so the rest of slimlm calls one spelling.

transformers 5.x renames the KV-cache argument ``past_key_values`` to ``cache`` (deprecated with a
``FutureWarning`` on every call, removal announced for 5.40) and the output field likewise. Older
releases in the supported range only know ``past_key_values``. Which name a model takes is read from
its ``forward`` signature (once per class), not from a version number.
"""

from __future__ import annotations

import inspect
from functools import cache as _memo
from typing import Any, Callable

OLD, NEW = "past_key_values", "cache"


@_memo
def _takes_cache(fn: Callable[..., Any]) -> bool:
    try:
        return NEW in inspect.signature(fn).parameters  # follows functools.wraps to the real signature
    except (TypeError, ValueError):
        return False


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` where the model's ``forward`` takes it, else ``{"past_key_values": cache}``;
    for ``model(...)`` and ``model.generate(...)`` alike (both were renamed in the same release)."""
    return {NEW if _takes_cache(type(model).forward) else OLD: cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, read without touching the deprecated alias."""
    fields = getattr(out, "__dataclass_fields__", {})  # ModelOutput subclasses are dataclasses
    return getattr(out, NEW if NEW in fields else OLD, None)
