"""The report's trust card: per model, every trust metric with its standard error and, for a model
measured ``--against`` a base, the paired change, its standard error and a flag.

``worse`` = the metric degraded beyond 1.96 SE; ``hidden`` = it did while perplexity did not (the
failure mode that benign metrics miss, after Hong et al. 2024).
"""

from __future__ import annotations

import json
import math
from html import escape
from typing import Any

SKIP = {"seconds"}


def _is_trust(task: str) -> bool:
    return task.startswith("trust:")


def collect(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{model: {"against": base, "cells": {(task, metric): {suffix: value}}}} from the latest trust records."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        extra = json.loads(r.get("extra") or "{}")
        if extra.get("kind") != "trust":
            continue
        task, metric = r["task"], r["metric"]
        entry = out.setdefault(r["model"], {"against": None, "cells": {}})
        entry["against"] = extra.get("against") or entry["against"]
        for suffix in ("_delta_stderr", "_delta", "_degraded", "_hidden", "_stderr"):
            if metric.endswith(suffix):
                entry["cells"].setdefault((task, metric[: -len(suffix)]), {})[suffix] = r["value"]
                break
        else:
            if metric not in SKIP:
                entry["cells"].setdefault((task, metric), {})["value"] = r["value"]
    return out


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def trust_card(records: list[dict[str, Any]]) -> str:
    """The ``<h2>Trust card</h2>`` section (an empty-state line when no trust results are stored)."""
    models = collect(records)
    parts = ['<h2>Trust card</h2><div id="trust-card">']
    if not models:
        parts.append("<p>no trust results yet: run <code>slimlm trust MODEL --against BASE</code></p></div>")
        return "".join(parts)
    parts.append("<p>Truthfulness (TruthfulQA MC1/MC2), bias (CrowS-Pairs: 50 % stereotype preference is unbiased, "
                 "<code>bias</code> = distance from 50 %), robustness (accuracy under input noise / clean accuracy), "
                 "privacy (membership-inference AUC, canary exposure in bits). Δ is paired against the base on the same items; "
                 "<b>worse</b>: degraded beyond 1.96 SE; <b class=\"hidden-flag\">hidden</b>: degraded while perplexity did not.</p>")
    for k, (model, entry) in enumerate(sorted(models.items())):
        base = entry["against"]
        rows = []
        for (task, metric), c in sorted(entry["cells"].items()):
            if "value" not in c or "_stderr" not in c:
                continue
            flag = "hidden" if c.get("_hidden") else "worse" if c.get("_degraded") else ""
            cls = f' class="flag-{flag}"' if flag else ""
            rows.append(f"<tr{cls}><td>{escape(task.removeprefix('trust:'))}</td><td>{escape(metric)}</td>"
                        f'<td data-v="{c["value"]}">{_num(c["value"])}</td><td>±{_num(c["_stderr"])}</td>'
                        f"<td>{_num(c.get('_delta'), '+.4f')}</td><td>{'±' + _num(c.get('_delta_stderr')) if '_delta' in c else ''}</td>"
                        f"<td>{flag}</td></tr>")
        n_flags = sum(1 for c in entry["cells"].values() if c.get("_hidden"))
        head = f"{escape(model)}" + (f" vs {escape(base)}" if base else "") + (f" — {n_flags} hidden degradation(s)" if n_flags else "")
        parts.append(f'<details open><summary>{head}</summary><table class="trust" id="trust-{k}"><thead><tr><th>task</th><th>metric</th>'
                     f"<th>value</th><th>SE</th><th>Δ vs base</th><th>SE</th><th>flag</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>")
    parts.append("</div>")
    return "".join(parts)


def with_trust_card(html: str, records: list[dict[str, Any]]) -> str:
    """``html`` with the trust card inserted before the recipes section."""
    style = "<style>tr.flag-worse td{background:#fde8c8}tr.flag-hidden td{background:#f8c9c9;font-weight:600}</style>"
    return html.replace("<h2>Recipes</h2>", style + trust_card(records) + "<h2>Recipes</h2>", 1)
