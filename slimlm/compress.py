"""Apply a recipe to a model, step by step, and optionally save the artifact."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slimlm.artifact import DTYPES, save_artifact, storage_round
from slimlm.errors import SlimlmError
from slimlm.layers.sparse import compact_sparse
from slimlm.memory import compact_heap
from slimlm.methods import METHODS, StepContext, StepReport
from slimlm.models.load import LoadedModel, count_params, load, make_info
from slimlm.recipe import Recipe


@dataclass
class CompressResult:
    model: LoadedModel
    reports: list[StepReport]
    out: Path | None


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    return Recipe.from_yaml(text) if "\n" in text or text.lstrip().startswith("{") else Recipe.load(text)


def compress(source: str | Path | LoadedModel, recipe: Recipe | str | Path, out: str | Path | None = None,
             *, overwrite: bool = False) -> CompressResult:
    """Compress ``source`` with ``recipe`` (object, YAML text or path); save to ``out`` if given.

    The model is changed in place when a :class:`LoadedModel` is passed; after an error it may be
    partly converted (weights are checked layer by layer as the pass reaches them), so reload it.
    """
    recipe = _as_recipe(recipe)
    if out is not None and Path(out).exists() and not overwrite:
        raise SlimlmError(f"output folder {out} already exists", "choose another --out or pass --overwrite")
    lm = source if isinstance(source, LoadedModel) else load(source)
    source_params = count_params(lm.model)
    bos = lm.tokenizer.bos_token_id if lm.info.add_bos else None
    ctx = StepContext(lm.model, lm.arch, lm.tokenizer, recipe.calibration, lm.info.source, bos_id=bos)
    reports = []
    t0 = time.perf_counter()
    with compact_heap():  # freed layer-sized temporaries go back to the OS (slimlm/memory.py)
        for step in recipe.steps:
            reports.append(METHODS.get(step.method).run(ctx, step.config))
        compact_sparse(lm.model, DTYPES[recipe.storage_dtype])  # pruned layers → compact formats (layers/sparse.py)
        storage_round(lm.model, recipe.storage_dtype)
    recipe_yaml = recipe.to_yaml()
    info = make_info(lm.model, lm.tokenizer, lm.info.source, lm.info.source_kind, lm.info.source_hash, recipe_yaml)
    result_lm = LoadedModel(lm.model, lm.tokenizer, info)
    saved = None
    if out is not None:
        report = {"seconds": time.perf_counter() - t0, "source_params": source_params, "steps": [asdict(r) for r in reports]}
        saved = save_artifact(result_lm, out, recipe_yaml=recipe_yaml, storage_dtype=recipe.storage_dtype,
                              report=report, overwrite=overwrite)
        info.weights_dir = str(saved)
    return CompressResult(result_lm, reports, saved)
