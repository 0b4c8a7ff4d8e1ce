"""Inline SVG charts (no JavaScript library, no CDN): scatter plots with a Pareto frontier, bar charts."""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

W, H, PAD = 460, 320, 52


def pareto_front(points: Sequence[tuple[float, float]], x_low: bool, y_low: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (``*_low``: lower is better)."""
    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, ay = (-a[0] if x_low else a[0]), (-a[1] if y_low else a[1])
        bx, by = (-b[0] if x_low else b[0]), (-b[1] if y_low else b[1])
        return ax >= bx and ay >= by and (ax > bx or ay > by)

    return [i for i, p in enumerate(points) if not any(better(q, p) for j, q in enumerate(points) if j != i)]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def scatter(svg_id: str, title: str, xs: list[float], ys: list[float], labels: list[str], x_label: str, y_label: str,
            x_low: bool, y_low: bool) -> str:
    """A scatter plot; Pareto-optimal points are filled and joined by the frontier line."""
    if not xs:
        return f'<svg id="{svg_id}" class="plot" width="{W}" height="{H}"><text x="20" y="40">{escape(title)}: no data</text></svg>'
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 1, x1 + 1) if x0 == x1 else (x0 - 0.05 * (x1 - x0), x1 + 0.05 * (x1 - x0))
    y0, y1 = (y0 - 1, y1 + 1) if y0 == y1 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))

    def px(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - PAD - 12)

    def py(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - PAD - 28)

    front = pareto_front(list(zip(xs, ys)), x_low, y_low)
    out = [f'<svg id="{svg_id}" class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" class="title">{escape(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 12}" y2="{H - PAD}" class="axis"/>',
           f'<line x1="{PAD}" y1="28" x2="{PAD}" y2="{H - PAD}" class="axis"/>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{H - PAD + 16}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<text x="{PAD - 4}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" class="label">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{H / 2}" text-anchor="middle" class="label" transform="rotate(-90 14 {H / 2})">{escape(y_label)}</text>')
    line = sorted(front, key=lambda i: xs[i])
    if len(line) > 1:
        pts = " ".join(f"{px(xs[i]):.1f},{py(ys[i]):.1f}" for i in line)
        out.append(f'<polyline points="{pts}" class="front"/>')
    for i, (x, y, lab) in enumerate(zip(xs, ys, labels)):
        cls = "pt pareto" if i in front else "pt"
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" class="{cls}"><title>{escape(lab)}\n{x_label}: {_fmt(x)}\n'
                   f'{y_label}: {_fmt(y)}</title></circle>')
        out.append(f'<text x="{px(x) + 7:.1f}" y="{py(y) - 6:.1f}" class="ptlabel">{escape(lab.splitlines()[0][-28:])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bars(svg_id: str, title: str, names: list[str], values: list[float], width: int = 940, height: int = 220) -> str:
    """One bar per layer (e.g. relative reconstruction error), hover shows the layer's name."""
    top = max(values, default=0.0) or 1.0
    bw = (width - PAD - 10) / max(len(values), 1)
    out = [f'<svg id="{svg_id}" class="bars" width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{width / 2}" y="14" text-anchor="middle" class="title">{escape(title)}</text>',
           f'<line x1="{PAD}" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}" class="axis"/>',
           f'<text x="{PAD - 4}" y="30" text-anchor="end" class="tick">{_fmt(top)}</text>',
           f'<text x="{PAD - 4}" y="{height - 20}" text-anchor="end" class="tick">0</text>']
    for i, (n, v) in enumerate(zip(names, values)):
        h = (height - 50) * (v / top if math.isfinite(v) else 0.0)
        out.append(f'<rect x="{PAD + i * bw:.2f}" y="{height - 20 - h:.2f}" width="{max(bw - 0.5, 0.5):.2f}" height="{h:.2f}" '
                   f'class="bar"><title>{escape(n)}: {v:.4g}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)


COLORS = ("#36c", "#d33", "#393", "#f90", "#939", "#0aa", "#a52", "#555", "#c39", "#999")


def lines(svg_id: str, title: str, series: dict[str, tuple[list[float], list[float]]], x_label: str, y_label: str,
          dashed: tuple[str, ...] = ()) -> str:
    """Line chart of several series (e.g. cascade accuracy vs escalation rate per signal), with a legend."""
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if math.isfinite(y)]
    if not pts:
        return f'<svg id="{svg_id}" class="plot" width="{W}" height="{H}"><text x="20" y="40">{escape(title)}: no data</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 0.01)
    width = W + 130

    def px(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - PAD - 12)

    def py(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - PAD - 28)

    out = [f'<svg id="{svg_id}" class="plot" width="{width}" height="{H}" viewBox="0 0 {width} {H}" xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" class="title">{escape(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 12}" y2="{H - PAD}" class="axis"/>',
           f'<line x1="{PAD}" y1="28" x2="{PAD}" y2="{H - PAD}" class="axis"/>',
           f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle" class="label">{escape(x_label)}</text>',
           f'<text x="14" y="{H / 2}" text-anchor="middle" class="label" transform="rotate(-90 14 {H / 2})">{escape(y_label)}</text>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{px(t):.1f}" y="{H - PAD + 16}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<text x="{PAD - 4}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    for k, (name, (xs, ys)) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        dash = ' stroke-dasharray="4 3"' if name in dashed else ""
        poly = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if math.isfinite(y))
        out.append(f'<polyline points="{poly}" fill="none" stroke="{color}" stroke-width="1.5"{dash}><title>{escape(name)}</title></polyline>')
        out.append(f'<text x="{W + 4}" y="{34 + 14 * k}" class="ptlabel" style="fill:{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)
