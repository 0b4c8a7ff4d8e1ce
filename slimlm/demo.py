"""The main job: the default model, then 8-bit and 4-bit RTN, reloaded from disk and compared."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from slimlm.compress import compress
from slimlm.eval.run import evaluate, resolve_eval_source
from slimlm.models import load
from slimlm.recipe import Recipe
from slimlm.results import append_rows

DEMO_RECIPES = {
    "rtn8": "steps: [{rtn: {bits: 8, group_size: -1}}]",
    "rtn4-g128": "steps: [{rtn: {bits: 4, group_size: 128}}]",
}


def run_demo(out: str = "slimlm-out/demo", data: str = "auto", max_tokens: int = 8192, results: str | None = None,
             show: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Evaluate fp32, RTN-8 and RTN-4 g128 of the default model; ``show`` prints the before/after table
    (the CLI passes its own table printer, so this module needs nothing from the CLI)."""
    source = resolve_eval_source(data)
    print(f"slimlm demo: SmolLM2-135M (default) — perplexity on {source}, first {max_tokens} tokens, 512-token windows")
    rows = evaluate(load("default"), data=source, max_tokens=max_tokens, label="fp32 (default)")
    for name, text in DEMO_RECIPES.items():
        folder = Path(out) / name
        compress("default", Recipe.from_yaml(text), folder, overwrite=True)
        rows += evaluate(load(folder), data=source, max_tokens=max_tokens, label=name)  # reloaded from disk
    path = append_rows(rows, results)
    if show is not None:
        print()
        show(rows)
    print(f"\nartifacts: {Path(out).resolve()}/{{{','.join(DEMO_RECIPES)}}}\nresults:   {path.resolve()}")
    return rows
