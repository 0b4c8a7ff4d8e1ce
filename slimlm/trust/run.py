"""Run trust suites on a model (and its base), compare them paired, and make result rows.

``run_trust`` scores every suite's items once per model; ``compare`` turns two runs on the same
items into deltas with paired-bootstrap standard errors and a ``degraded`` flag (the change goes the
bad way by more than 1.96 SE). ``hidden`` marks a degradation that perplexity does not show: the
metric degraded beyond its error bar while perplexity did not degrade beyond its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from slimlm.data import load_text
from slimlm.errors import SlimlmError
from slimlm.eval.lm import SlimlmLM
from slimlm.models.load import LoadedModel
from slimlm.results import run_metadata
from slimlm.trust.spec import SUITES, suite_tasks, task_spec
from slimlm.trust.stats import Metric, degraded, paired_delta
from slimlm.trust.suites import perplexity_metric, run_scorer


@dataclass
class TrustRun:
    """Every trust metric of one model, by task (``trust:<task>``)."""

    label: str
    tasks: dict[str, list[Metric]] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def parse_suites(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    names = list(SUITES) if names == ["all"] else names
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise SlimlmError(f"unknown trust suite {(bad or [text])[0]!r}", f"use all or a comma list of {', '.join(SUITES)}")
    return names


def perplexity_text() -> tuple[str, str]:
    """WikiText-2 test when the data folder has it, else the held-out Shakespeare plays."""
    try:
        return "wikitext2", load_text("wikitext2", "eval")
    except SlimlmError:
        return "shakespeare", load_text("shakespeare", "eval")


def run_trust(lm: LoadedModel, suites: list[str], *, label: str, n: int | None = None, seed: int | None = 0,
              privacy: dict[str, Any] | None = None, ppl_tokens: int = 4096, batch_tokens: int = 4096,
              overrides: dict[str, dict[str, Any]] | None = None) -> TrustRun:
    """Score ``lm`` on the shipped tasks of ``suites`` (``n`` items each, a ``seed``-ed sample), its
    perplexity (the flag's reference) and, for ``privacy``, :func:`~slimlm.trust.privacy.privacy_metrics`.
    ``overrides`` maps a task name to its own ``limit`` and ``options`` (merged over the task file's)."""
    slm = SlimlmLM(lm, batch_tokens=batch_tokens)
    run = TrustRun(label)
    t0 = time.perf_counter()
    data, text = perplexity_text()
    run.tasks[f"perplexity:{data}"] = [perplexity_metric(slm, text, max_tokens=ppl_tokens)]
    run.seconds[f"perplexity:{data}"] = time.perf_counter() - t0
    for t in suite_tasks(suites):
        t0 = time.perf_counter()
        over = (overrides or {}).get(t.name, {})
        spec = task_spec(t, limit=over.get("limit", n), seed=seed)
        options = {**t.options, **over.get("options", {})}
        run.n[f"trust:{t.name}"], run.tasks[f"trust:{t.name}"] = run_scorer(slm, spec, t.scorer, options)
        run.seconds[f"trust:{t.name}"] = time.perf_counter() - t0
    if "privacy" in suites:
        from slimlm.trust.privacy import privacy_metrics

        t0 = time.perf_counter()
        run.tasks["trust:privacy"] = privacy_metrics(slm, **(privacy or {}))
        run.seconds["trust:privacy"] = time.perf_counter() - t0
    return run


def compare(run: TrustRun, base: TrustRun) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {metric: {"delta", "delta_stderr", "degraded", "hidden"}}} of ``run`` against ``base``."""
    ppl_bad = False
    out: dict[str, dict[str, dict[str, float]]] = {}
    for task, metrics in run.tasks.items():
        ref = {m.name: m for m in base.tasks.get(task, [])}
        for m in metrics:
            if m.name not in ref:
                continue
            d, se = paired_delta(m, ref[m.name])
            out.setdefault(task, {})[m.name] = {"delta": d, "delta_stderr": se, "degraded": float(degraded(d, se, m.better))}
            if task.startswith("perplexity:"):
                ppl_bad = ppl_bad or degraded(d, se, m.better)
    for task, metrics in out.items():
        for cell in metrics.values():
            cell["hidden"] = float(bool(cell["degraded"]) and not ppl_bad and not task.startswith("perplexity:"))
    return out


def trust_rows(lm: LoadedModel, run: TrustRun, base: TrustRun | None = None, against: str | None = None) -> list[dict[str, Any]]:
    """One result row per task: ``metric`` and ``metric_stderr``; with a base also ``metric_delta``,
    ``metric_delta_stderr``, ``metric_degraded`` and ``metric_hidden`` (1/0), and ``against``."""
    deltas = compare(run, base) if base is not None else {}
    meta = {"model": run.label, "source_kind": lm.info.source_kind, "source_hash": lm.info.source_hash,
            "model_type": lm.info.model_type, "recipe": lm.info.recipe, "kind": "trust", **run_metadata()}
    rows = []
    for task, metrics in run.tasks.items():
        row: dict[str, Any] = {"task": task, "n": run.n.get(task), "seconds": run.seconds.get(task), **meta}
        if against:
            row["against"] = against
        for m in metrics:
            row[m.name] = m.value
            row[f"{m.name}_stderr"] = m.se
            for k, v in deltas.get(task, {}).get(m.name, {}).items():
                row[f"{m.name}_{k}"] = v
        rows.append(row)
    return rows
