"""``slimlm report``: one self-contained HTML page from the results store — a sortable leaderboard,
Pareto plots (quality vs size, vs tokens/s, vs energy), per-layer error charts of compressed
artifacts, each model's recipe and, given a ``benchmarks/route.py`` result, the cascade's
cost/quality curves. Everything is inline (SVG + a few lines of JS), no CDN."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from slimlm.report.page import page
from slimlm.report.route import route_section
from slimlm.report.svg import bars, scatter
from slimlm.report.trust import with_trust_card
from slimlm.store import ResultsStore

# Per task, the first of these metrics that is present is the task's quality column.
QUALITY = ("acc_norm", "acc", "exact_match", "contains", "token_perplexity", "perplexity")
LOWER_BETTER = {"token_perplexity", "perplexity", "word_perplexity"}
COST = (("weight MB", "weight_bytes_in_memory", 1e-6), ("disk MB", "bytes_on_disk", 1e-6), ("ratio", "compression_ratio", 1),
        ("TTFT s", "ttft_s", 1), ("decode tok/s", "decode_tok_s", 1), ("b16 tok/s", "throughput_b16_tok_s", 1),
        ("peak RSS MB", "peak_rss_bytes", 1e-6), ("CPU %", "cpu_util_pct", 1), ("J/token", "j_per_token", 1))
AXES = (("pareto-size", "quality vs size", "weight_bytes_in_memory", "weight MB", 1e-6, True),
        ("pareto-speed", "quality vs decode speed", "decode_tok_s", "decode tok/s", 1, False),
        ("pareto-energy", "quality vs energy", "j_per_token", "J/token", 1, True))


def summarize(records: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, str]]:
    """Per model: latest value of each ``task metric`` quality column, of each cost metric, and its recipe."""
    raw: dict[str, dict[tuple[str, str], float]] = {}
    recipes: dict[str, str] = {}
    for r in records:  # oldest first, so later runs overwrite earlier ones
        raw.setdefault(r["model"], {})[(r["task"], r["metric"])] = r["value"]
        if r.get("recipe"):
            recipes[r["model"]] = r["recipe"]
    quality: dict[str, dict[str, float]] = {}
    cost: dict[str, dict[str, float]] = {}
    for model, vals in raw.items():
        tasks = {t for t, _ in vals}
        for task in sorted(tasks):
            metric = next((m for m in QUALITY if (task, m) in vals), None)
            if metric:
                quality.setdefault(model, {})[f"{task} {metric}"] = vals[(task, metric)]
        cost[model] = {m: v for (_, m), v in vals.items() if m in {c for _, c, _ in COST}}
    return quality, cost, recipes


def artifact_paths(records: list[dict[str, Any]]) -> list[str]:
    """Artifact folders that results rows recorded (``slimlm bench`` does), in first-seen order."""
    paths: dict[str, None] = {}
    for r in records:
        art = json.loads(r.get("extra") or "{}").get("artifact")
        if art:
            paths[art] = None
    return list(paths)


def primary_quality(quality: dict[str, dict[str, float]]) -> str | None:
    """The quality column most models have (accuracy preferred over perplexity on ties)."""
    counts: dict[str, int] = {}
    for cols in quality.values():
        for c in cols:
            counts[c] = counts.get(c, 0) + 1
    return max(counts, key=lambda c: (counts[c], c.split()[-1] not in LOWER_BETTER, c), default=None)


def layer_error_charts(artifacts: list[Path]) -> list[str]:
    """Bar charts of ``report.steps[].layer_errors`` from each artifact's ``slimlm.json``."""
    charts = []
    for k, art in enumerate(artifacts):
        try:
            manifest = json.loads((art / "slimlm.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for j, step in enumerate(manifest.get("report", {}).get("steps", [])):
            errs = step.get("layer_errors") or {}
            if errs:
                charts.append(bars(f"layer-errors-{k}-{j}", f"{art.name}: {step.get('method')} — relative error per layer "
                                   f"({len(errs)} layers)", list(errs), [float(v) for v in errs.values()]))
    return charts


def build_report(out: str | Path = "slimlm-results/report.html", *, db: str | Path | None = None,
                 artifacts: list[str | Path] = (), routes: list[str | Path] = ()) -> Path:
    """Write the report for every model in the results store; returns the HTML file."""
    store = ResultsStore(db)
    quality, cost, recipes = summarize(store.query())
    models = sorted(set(quality) | set(cost))
    qcols = sorted({c for cols in quality.values() for c in cols})
    head = ["model", *qcols, *(n for n, _, _ in COST)]
    body = []
    for m in models:
        cells = [f'<td>{escape(m)}</td>']
        for c in qcols:
            v = quality.get(m, {}).get(c)
            cells.append(f'<td data-v="{v}">{v:.4g}</td>' if v is not None else '<td data-v="">-</td>')
        for _, key, scale in COST:
            v = cost.get(m, {}).get(key)
            cells.append(f'<td data-v="{v}">{v * scale:.4g}</td>' if v is not None else '<td data-v="">-</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    primary = primary_quality(quality)
    plots = []
    for svg_id, title, key, label, scale, x_low in AXES:
        pts = [(cost[m][key] * scale, quality[m][primary], f"{m}\nrecipe: {(recipes.get(m) or 'none (source model)').strip()}")
               for m in models if primary and key in cost.get(m, {}) and primary in quality.get(m, {})]
        plots.append(scatter(svg_id, f"{title}", [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], label,
                             primary or "quality", x_low, bool(primary and primary.split()[-1] in LOWER_BETTER)))
    arts = [Path(a) for a in artifacts] + [Path(m) for m in models if (Path(m) / "slimlm.json").is_file()]
    arts += [Path(a) for a in artifact_paths(store.query()) if (Path(a) / "slimlm.json").is_file()]
    charts = layer_error_charts(list(dict.fromkeys(arts)))
    recipe_html = "".join(f"<details><summary>{escape(m)}</summary><pre>{escape(recipes.get(m) or 'none (source model)')}</pre></details>"
                          for m in models)
    html = page(head, body, plots, charts, recipe_html, primary, str(store.path), len(models), route_section(routes))
    html = with_trust_card(html, store.query())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out
