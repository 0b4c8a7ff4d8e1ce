"""Apply a recipe to a model, step by step, and finalise it (compact, round, optionally save).

Every path that produces an artifact — ``compress`` and ``slimlm distill`` — ends in :func:`finalise`,
so pruned layers are compacted and floats rounded through the storage dtype the same way everywhere.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slimlm.artifact import DTYPES, save_artifact, storage_round
from slimlm.errors import SlimlmError
from slimlm.layers.sparse import compact_sparse
from slimlm.memory import compact_heap
from slimlm.methods import METHODS, StepContext, StepReport, refusal
from slimlm.models.info import LoadedModel, count_params, make_info
from slimlm.models.load import load
from slimlm.recipe import Recipe, Step


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


def check_steps(lm: LoadedModel, steps: list[Step]) -> None:
    """Refuse, before any work, a step whose declared needs this model cannot meet, or full training after
    a step that packed the layers (it could update only norms and biases) — one line each."""
    packer: tuple[int, str] | None = None
    for i, step in enumerate(steps, start=1):
        reason = refusal(step.method, step.config, lm.model, lm.arch)
        if reason:
            raise SlimlmError(f"step {i} {reason}", "drop or change this step for this model (see docs/architectures.md)")
        method = METHODS.get(step.method)
        if packer and method.trains_dense(step.config):
            raise SlimlmError(f"step {i} {step.method}: step {packer[0]} ({packer[1]}) packs the layers, so training could "
                              "update only norms and biases", f"put {step.method} before {packer[1]}, or set lora_r (QLoRA)")
        if packer is None and not method.keeps_dense(step.config):
            packer = (i, step.method)


def step_context(lm: LoadedModel, recipe: Recipe) -> StepContext:
    bos = lm.tokenizer.bos_token_id if lm.info.add_bos else None
    return StepContext(lm.model, lm.arch, lm.tokenizer, recipe.calibration, lm.info.source, bos_id=bos)


def run_steps(ctx: StepContext, steps: list[Step]) -> list[StepReport]:
    return [METHODS.get(step.method).run(ctx, step.config) for step in steps]


def dense_prefix(steps: list[Step]) -> int:
    """How many leading steps leave trainable dense layers (training may follow them)."""
    for i, step in enumerate(steps):
        if not METHODS.get(step.method).keeps_dense(step.config):
            return i
    return len(steps)


def finalise(lm: LoadedModel, *, recipe_yaml: str, storage_dtype: str, out: str | Path | None = None,
             report: dict[str, Any] | None = None, overwrite: bool = False) -> tuple[LoadedModel, Path | None]:
    """Compact pruned layers, round floats through the storage dtype (so a reload is bit-identical),
    refresh the model facts and, with ``out``, write the artifact atomically."""
    compact_sparse(lm.model, DTYPES[storage_dtype])  # pruned layers → compact formats (layers/sparse.py)
    storage_round(lm.model, storage_dtype)
    info = make_info(lm.model, lm.tokenizer, lm.info.source, lm.info.source_kind, lm.info.source_hash, recipe_yaml)
    result = LoadedModel(lm.model, lm.tokenizer, info)
    saved = None
    if out is not None:
        saved = save_artifact(result, out, recipe_yaml=recipe_yaml, storage_dtype=storage_dtype, report=report or {},
                              overwrite=overwrite)
        info.weights_dir = str(saved)
    return result, saved


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
    check_steps(lm, recipe.steps)
    source_params = count_params(lm.model)
    ctx = step_context(lm, recipe)
    t0 = time.perf_counter()
    with compact_heap():  # freed layer-sized temporaries go back to the OS (slimlm/memory.py)
        reports = run_steps(ctx, recipe.steps)
        report = {"source_params": source_params, "steps": [asdict(r) for r in reports]}
        result, saved = finalise(lm, recipe_yaml=recipe.to_yaml(), storage_dtype=recipe.storage_dtype, out=out,
                                 report=report | {"seconds": time.perf_counter() - t0}, overwrite=overwrite)
    return CompressResult(result, reports, saved)
