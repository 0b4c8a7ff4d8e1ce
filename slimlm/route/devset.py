"""Labelled dev sets for ``slimlm route tune``: read them, answer them with every tier, tune the router.

A dev file is JSONL with one item per line, in either form:

* ``{"prompt": "...", "answer": "..."}`` (or ``"messages"`` instead of ``"prompt"``; ``answer`` may be a
  list of accepted answers): every tier answers greedily and is right when its normalised text
  contains a normalised accepted answer (the tasks' ``contains`` metric);
* ``{"tiers": [{"correct": true, "evidence": {...}}, …, {"correct": false}]}``: per-tier results
  already scored (what ``benchmarks/route.py`` caches), evidence in :class:`Evidence`'s fields.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.route.config import RouterConfig
from slimlm.route.learned import fit_logistic
from slimlm.route.signals import FEATURES, SIGNALS, Evidence, features
from slimlm.route.tune import TuneResult, apgr, tune

Item = list[tuple[bool, Evidence]]  # per tier: (correct, evidence)


def read_dev(path: str | Path) -> list[dict[str, Any]]:
    from slimlm.eval.tasks.readers import parse_jsonl_lines

    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"dev set {p} not found", "pass a JSONL file of labelled items (see docs/serving.md)")
    rows = parse_jsonl_lines(p.read_text(encoding="utf-8").splitlines(), str(p))
    if not rows:
        raise SlimlmError(f"dev set {p} is empty", "add labelled items, one JSON object per line")
    return rows


def scored_item(row: dict[str, Any], n_tiers: int, where: str) -> Item:
    tiers = row.get("tiers")
    if not isinstance(tiers, list) or len(tiers) != n_tiers:
        raise SlimlmError(f"{where}: `tiers` must list {n_tiers} results (one per router tier)", "match the router's tiers")
    out = []
    for t in tiers:
        ev = t.get("evidence") or {}
        try:
            out.append((bool(t["correct"]), Evidence(**ev)))
        except (KeyError, TypeError) as exc:
            raise SlimlmError(f"{where}: a tier result is malformed ({exc})", "give each tier `correct` and optional `evidence`") from None
    return out


def answer_items(rows: list[dict[str, Any]], tiers: list[Any], need: Any, max_new_tokens: int = 64) -> list[Item]:
    """Run every tier on every prompt (greedy) and judge it against the item's answers."""
    from slimlm.route.tiers import Need, Query, normalise
    from slimlm.runtime.sampling import GenConfig

    items = []
    for row in rows:
        answers = row.get("answer")
        if answers is None or ("prompt" not in row and "messages" not in row):
            raise SlimlmError(f"dev item at line {row.get('_line')}: needs `prompt` (or `messages`) and `answer`",
                              "label every item, or give pre-scored `tiers`")
        gold = [normalise(str(a)) for a in (answers if isinstance(answers, list) else [answers])]
        q = Query(prompt=row.get("prompt"), messages=row.get("messages"), cfg=GenConfig(max_new_tokens=max_new_tokens))
        item = []
        for i, tier in enumerate(tiers):
            ans = tier.answer(q, need if i < len(tiers) - 1 else Need())
            pred = normalise(ans.text)
            item.append((any(g and g in pred for g in gold), ans.evidence))
        items.append(item)
    return items


def arrays(items: list[Item], score: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per non-final tier the confidences, per tier the correctness."""
    n = len(items[0])
    confs = [np.array([score(it[i][1]) for it in items], dtype=float) for i in range(n - 1)]
    oks = [np.array([it[i][0] for it in items], dtype=bool) for i in range(n)]
    return confs, oks


def tune_router(cfg: RouterConfig, items: list[Item], *, signal: str, ratio: float) -> tuple[RouterConfig, TuneResult, dict[str, Any]]:
    """Thresholds for ``signal`` (``auto``: the signal reaching the target at the lowest cost, then highest APGR)."""
    candidates = [s for s in SIGNALS.names()] + ["learned"] if signal == "auto" else [signal]
    costs = [t.cost for t in cfg.tiers]
    report: dict[str, Any] = {}
    best = None
    for sig in candidates:
        learned = None
        if sig == "learned":
            x = np.array([features(it[0][1]) for it in items])
            y = np.array([it[0][0] for it in items], dtype=float)
            try:
                router = fit_logistic(x, y, FEATURES)
            except SlimlmError:
                if signal == "learned":
                    raise
                continue
            learned, score = router.to_dict(), router.predict
        else:
            score = SIGNALS.get(sig)
        confs, oks = arrays(items, score)
        res = tune(confs, oks, ratio=ratio, costs=costs)
        area = apgr(confs[0], oks[0], oks[1]) if len(oks) == 2 else math.nan
        report[sig] = {"met": res.met, "accuracy": res.accuracy, "escalation": res.escalation, "cost": res.cost,
                       "apgr": None if math.isnan(area) else area}
        key = (not res.met, res.cost if res.met else -res.accuracy, -(0 if math.isnan(area) else area))
        if best is None or key < best[0]:
            best = (key, sig, res, learned)
    assert best is not None
    _, sig, res, learned = best
    tiers = [t.model_copy(update={"threshold": th}) for t, th in zip(cfg.tiers, res.thresholds)] + [cfg.tiers[-1]]
    tuned = {"signal": sig, "target_ratio": ratio, "items": len(items), **{k: v for k, v in asdict(res).items() if k != "thresholds"},
             "tier_accuracy": [float(np.mean([it[i][0] for it in items])) for i in range(len(cfg.tiers))]}
    new = cfg.model_copy(update={"signal": sig, "learned": learned, "tiers": tiers, "tuned": tuned})
    return new, res, report
