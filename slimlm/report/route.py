"""The report's cascade section: accuracy vs escalation rate per confidence signal (and random routing),
with each signal's APGR and CPT(98 %), from ``benchmarks/route.py`` JSON files."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.report.svg import lines


def route_section(paths: list[str | Path]) -> str:
    if not paths:
        return ""
    parts = ["<h2>Cascade routing: cost/quality</h2><p>Cascade accuracy on the held-out half as the share of queries "
             "escalated to the large model grows (0 % = small model alone, 100 % = large alone); random routing is dashed. "
             "CPT(98 %) is the escalation needed for 98 % of the large model's accuracy.</p>"]
    for k, path in enumerate(paths):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SlimlmError(f"route results {path} cannot be read ({exc})", "pass the JSON written by benchmarks/route.py") from None
        for name, task in data.get("tasks", {}).items():
            def pts(s: dict) -> tuple[list[float], list[float]]:
                xs = [0.0] + [float(r.rstrip("%")) for r in s["curve"]] + [100.0]
                return xs, [task["small_acc"], *s["curve"].values(), task["large_acc"]]

            series = {sig: pts(s) for sig, s in task["signals"].items()}
            series["random"] = pts(task["random"])
            parts.append(lines(f"route-{k}-{escape(name)}", f"{name}: accuracy vs escalation (n={task['n_heldout']} held out)",
                               series, "escalated to the large model (%)", "accuracy", dashed=("random",)))
            rows = "".join(f"<tr><td>{escape(sig)}</td><td>{s['apgr']:.3f}</td><td>{100 * s['cpt98']:.0f} %</td></tr>"
                           for sig, s in [*task["signals"].items(), ("random", task["random"])])
            parts.append(f"<table class='route'><thead><tr><th>{escape(name)} signal</th><th>APGR</th><th>CPT(98 %)</th></tr>"
                         f"</thead><tbody>{rows}</tbody></table>")
    return "".join(parts)
