"""``slimlm bench MATRIX.yaml``: models × recipes × tasks from one file, resumable through the store.

Each (model, recipe) cell is compressed once into ``out/<model>/<recipe>`` (reused when present), then
each task not already in the results store for that cell's label runs and is appended at once, so
an interrupted matrix resumes where it stopped. ``backend: ray`` fans the cells out to Ray workers
(a local Ray, or a cluster at ``address``); the driver alone writes the store.

    models: [default]
    recipes: {fp: null, rtn4: recipes/rtn4.yaml, rtn8: {steps: [{rtn: {bits: 8, group_size: -1}}]}}
    tasks: [piqa, blimp, cost]      # task names / YAML paths, and `cost` for the cost metrics
    limit: 100
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.results import append_rows, run_metadata
from slimlm.store import ResultsStore


class Matrix(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str]
    recipes: dict[str, str | dict[str, Any] | None] = {"fp": None}
    tasks: list[str]
    limit: int | None = None
    seed: int | None = None
    out: str = "slimlm-out/bench"
    threads: int | None = None


def load_matrix(path: str | Path) -> Matrix:
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"bench matrix {p} not found", "pass a YAML file with models:, recipes:, tasks:")
    try:
        raw = yaml.safe_load(p.read_text())
        matrix = Matrix(**(raw or {}))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SlimlmError(f"{p}{f', line {mark.line + 1}' if mark else ''}: invalid YAML", "fix the matrix file's syntax") from None
    except (ValidationError, TypeError) as exc:
        raise SlimlmError(f"{p}: {str(exc).splitlines()[0]} ({str(exc).splitlines()[1].strip() if isinstance(exc, ValidationError) else ''})",
                          "the matrix has models: [..], recipes: {label: path | mapping | null}, tasks: [..]") from None
    from slimlm.eval.tasks import load_task

    from slimlm.recipe import Recipe

    for t in matrix.tasks:  # fail before any work on an unknown task or recipe
        if t != "cost":
            load_task(t)
    for label, value in matrix.recipes.items():
        text = recipe_text(value)
        if text is not None:
            try:
                Recipe.from_yaml(text)
            except SlimlmError as exc:
                raise SlimlmError(f"{p}: recipe {label!r}: {exc.problem}", exc.fix or "give a recipe file or an inline recipe") from None
    return matrix


def recipe_text(value: str | dict[str, Any] | None) -> str | None:
    if value is None or isinstance(value, dict):
        return None if value is None else yaml.safe_dump(value)
    return Path(value).read_text() if Path(value).is_file() else value


def cell_label(model: str, recipe: str) -> str:
    return f"{model}/{recipe}"


def run_cell(model: str, recipe: str, text: str | None, tasks: list[str], matrix: dict[str, Any],
             on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Compress (or reuse) one cell's model and run its pending ``tasks``; rows go to ``on_rows`` as each finishes."""
    import torch

    import slimlm
    from slimlm.eval.cost import cost
    from slimlm.eval.tasks import task_rows

    if matrix.get("threads"):
        torch.set_num_threads(matrix["threads"])
    label = cell_label(model, recipe)
    if text is None:
        lm, artifact = slimlm.load(model), None
    else:
        artifact = Path(matrix["out"]) / re.sub(r"[^\w.-]+", "_", model) / recipe
        lm = slimlm.load(artifact) if (artifact / "slimlm.json").is_file() else slimlm.compress(model, text, artifact).model
    rows: list[dict[str, Any]] = []
    for task in tasks:
        if task == "cost":
            new = [{"kind": "cost", "task": "cost", "model": label, "recipe": lm.info.recipe, **cost(lm), **run_metadata()}]
        else:
            new = task_rows(lm, [task], limit=matrix.get("limit"), seed=matrix.get("seed"), label=label)
        for r in new:
            r["artifact"] = str(artifact) if artifact else None
        rows += new
        if on_rows:
            on_rows(new)
    return rows


def pending(matrix: Matrix, store: ResultsStore) -> list[tuple[str, str, list[str]]]:
    """Cells with the tasks the store does not have yet."""
    cells = []
    for model in matrix.models:
        for recipe in matrix.recipes:
            todo = [t for t in matrix.tasks if not store.has(cell_label(model, recipe), _task_name(t))]
            if todo:
                cells.append((model, recipe, todo))
    return cells


def _task_name(ref: str) -> str:
    if ref == "cost":
        return "cost"
    from slimlm.eval.tasks import load_task

    return load_task(ref).name


def run_on_ray(args: list[tuple[Any, ...]], save: Callable[[list[dict[str, Any]]], None], *, address: str | None,
               workers: int) -> None:
    """One Ray task per cell (1 CPU each); results are saved by the driver in completion order."""
    try:
        import ray
    except ImportError:
        raise SlimlmError("the ray backend needs Ray", "pip install 'ray==2.60.0', or use --backend local") from None
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a benchmark run
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        remote = ray.remote(num_cpus=1)(run_cell)
        waiting = [remote.remote(*a) for a in args]
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            save(ray.get(done[0]))
    finally:
        if started:
            ray.shutdown()


def run_bench(path: str | Path, *, backend: str = "local", address: str | None = None, workers: int = 2,
              results: str | Path | None = None) -> dict[str, int]:
    """Run every pending (model, recipe, task) of the matrix; returns counts of done and skipped units."""
    matrix = load_matrix(path)
    store = ResultsStore(Path(results).with_suffix(".db") if results else None)
    cells = pending(matrix, store)
    total = len(matrix.models) * len(matrix.recipes) * len(matrix.tasks)
    todo = sum(len(t) for _, _, t in cells)
    bar = tqdm(total=todo, desc="bench", unit="task")  # tqdm's ETA is the time estimate

    def save(rows: list[dict[str, Any]]) -> None:
        append_rows(rows, results)
        bar.update(len({r["task"] for r in rows}))

    t0 = time.perf_counter()
    args = [(m, r, recipe_text(matrix.recipes[r]), t, matrix.model_dump()) for m, r, t in cells]
    if backend == "ray":
        run_on_ray(args, save, address=address, workers=workers)
    elif backend == "local":
        for a in args:
            run_cell(*a, on_rows=save)
    else:
        raise SlimlmError(f"unknown bench backend {backend!r}", "use `local` or `ray`")
    bar.close()
    return {"done": todo, "skipped": total - todo, "seconds": int(time.perf_counter() - t0)}
