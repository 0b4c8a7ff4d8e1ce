"""Cascade routing measured: SmolLM2-135M (small) → Gemma-3-270M (large) on PIQA and HellaSwag.

Per item, both models' answers and the small model's evidence are cached (resumable: each run scores
what is missing within --budget-s, holding the CPU lock, and stops; the analysis runs once all items
are cached). Items alternate into a tuning half (even positions) and a held-out half (odd). Reported
per signal: cascade accuracy at escalation rates 10-90 %, APGR, RouteLLM's CPT(50/80 %), the lowest
escalation reaching 98 % of the large model's accuracy (the issue's CPT(98 %)), the threshold tuned for
that target on the tuning half and what it does on the held-out half, and random routing.

    flock /tmp/slimlm-cpu.lock .venv/bin/python benchmarks/route.py --piqa 300 --hellaswag 120
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import slimlm
from slimlm.eval.lm import SlimlmLM
from slimlm.eval.tasks.run import load_docs, mc_item
from slimlm.eval.tasks.spec import load_task
from slimlm.route import tune
from slimlm.route.learned import fit_logistic
from slimlm.route.mc import score_items
from slimlm.route.signals import FEATURES, SIGNALS, Evidence, features

MODELS = {"small": "default", "large": "gemma3-270m"}
RATES = [i / 10 for i in range(1, 10)]
SIGNAL_NAMES = ["lp_min", "lp_q10", "lp_q25", "lp_mean", "seq_logprob", "neg_entropy", "margin", "agreement", "learned"]


def cache_file(cache: Path, model: str, task: str) -> Path:
    return cache / f"{model}-{task}.jsonl"


def cached(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    return {r["i"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def score(cache: Path, sizes: dict[str, int], budget_s: float, chunk: int = 8) -> bool:
    """Fill the caches for up to ``budget_s`` seconds; True when everything is cached."""
    t_start = time.perf_counter()
    done = True
    for role, source in MODELS.items():
        todo = {t: [i for i in range(n) if i not in cached(cache_file(cache, role, t))] for t, n in sizes.items()}
        if not any(todo.values()):
            continue
        lm = slimlm.load(source)
        slm = SlimlmLM(lm, batch_tokens=2048)
        for task, idx in todo.items():
            spec = load_task(task, limit=sizes[task])
            docs = load_docs(spec)
            for c0 in range(0, len(idx), chunk):
                if time.perf_counter() - t_start > budget_s:
                    return False
                part = idx[c0 : c0 + chunk]
                items = [mc_item(docs[i], spec) for i in part]
                t0 = time.perf_counter()
                res = score_items(slm, [(ctx, ch) for ctx, ch, _ in items], delimiter=spec.delimiter, seed=part[0])
                per_item = (time.perf_counter() - t0) / len(part)
                with open(cache_file(cache, role, task), "a") as f:
                    for i, (ctx, ch, gold), (ans, ev) in zip(part, items, res):
                        f.write(json.dumps({"i": i, "gold": gold, "answer": ans, "correct": ans == gold, "seconds": per_item,
                                            "evidence": asdict(ev)}) + "\n")
                print(f"{role} {task}: {c0 + len(part)}/{len(idx)} ({per_item:.2f} s/item)", flush=True)
        del lm, slm
    return done


def signal_report(conf_t, s_t, l_t, conf_h, s_h, l_h) -> dict:
    """One signal: thresholds tuned on the tuning half, everything else measured on the held-out half."""
    res = tune.tune([conf_t], [s_t, l_t], ratio=0.98)
    acc_h, esc_h, _ = tune.simulate(res.thresholds, [conf_h], [s_h, l_h], [1.0, 1.0])
    _, _, th_best = tune.best_cut(conf_t, s_t, l_t)
    best_acc_h, best_esc_h, _ = tune.simulate([th_best], [conf_h], [s_h, l_h], [1.0, 1.0])
    return {"curve": dict(zip([f"{r:.0%}" for r in RATES], tune.curve(conf_h, s_h, l_h, RATES))),
            "apgr": tune.apgr(conf_h, s_h, l_h),
            "cpt98": tune.rate_for(conf_h, s_h, l_h, 0.98 * l_h.mean()),
            "cpt50_pgr": tune.pgr_rate(conf_h, s_h, l_h, 0.5), "cpt80_pgr": tune.pgr_rate(conf_h, s_h, l_h, 0.8),
            "tuned": {"threshold": res.thresholds[0], "tune_escalation": res.escalation, "tune_accuracy": res.accuracy,
                      "heldout_escalation": esc_h, "heldout_accuracy": acc_h,
                      "heldout_meets_98": bool(acc_h >= 0.98 * l_h.mean() - 1e-12)},
            "max_accuracy": {"threshold": th_best, "heldout_escalation": best_esc_h, "heldout_accuracy": best_acc_h}}


def analyse(cache: Path, sizes: dict[str, int]) -> dict:
    rows = {}
    for task in sizes:
        small, large = cached(cache_file(cache, "small", task)), cached(cache_file(cache, "large", task))
        rows[task] = [(small[i], large[i]) for i in range(sizes[task])]
    out: dict = {"items": {t: len(r) for t, r in rows.items()}, "split": "even positions tune, odd positions held out",
                 "models": MODELS, "tasks": {}}
    for name, pairs in [*rows.items(), ("pooled", [p for r in rows.values() for p in r])]:
        tune_half, held = pairs[0::2], pairs[1::2]

        def arr(half):
            ev = [Evidence(**s["evidence"]) for s, _ in half]
            return ev, np.array([s["correct"] for s, _ in half]), np.array([lg["correct"] for _, lg in half])

        ev_t, s_t, l_t = arr(tune_half)
        ev_h, s_h, l_h = arr(held)
        lat_s = float(np.mean([s["seconds"] for s, _ in held]))
        lat_l = float(np.mean([lg["seconds"] for _, lg in held]))
        res = {"n_tune": len(tune_half), "n_heldout": len(held), "small_acc": float(s_h.mean()), "large_acc": float(l_h.mean()),
               "oracle_acc": float((s_h | l_h).mean()), "tune_small_acc": float(s_t.mean()), "tune_large_acc": float(l_t.mean()),
               "latency_s": {"small": lat_s, "large": lat_l}, "random": {
                   "curve": dict(zip([f"{r:.0%}" for r in RATES], tune.random_curve(s_h, l_h, RATES))), "apgr": 0.5,
                   "cpt98": float(np.clip((0.98 * l_h.mean() - s_h.mean()) / (l_h.mean() - s_h.mean()), 0, 1))
                   if l_h.mean() != s_h.mean() else 0.0}, "signals": {}}
        for sig in SIGNAL_NAMES:
            if sig == "learned":
                router = fit_logistic(np.array([features(e) for e in ev_t]), s_t.astype(float), FEATURES)
                conf_t = router.predict_features(np.array([features(e) for e in ev_t]))
                conf_h = router.predict_features(np.array([features(e) for e in ev_h]))
            else:
                fn = SIGNALS.get(sig)
                conf_t, conf_h = np.array([fn(e) for e in ev_t]), np.array([fn(e) for e in ev_h])
            rep = signal_report(conf_t, s_t, l_t, conf_h, s_h, l_h)
            rep["tune_apgr"] = tune.apgr(conf_t, s_t, l_t)
            rep["cascade_latency_s"] = lat_s + rep["tuned"]["heldout_escalation"] * lat_l
            res["signals"][sig] = rep
        finite = {k: v["cpt98"] for k, v in res["signals"].items() if not math.isnan(v["cpt98"])}
        res["best_signal"] = min(finite, key=lambda k: (finite[k], -res["signals"][k]["apgr"])) if finite else None
        # chosen without looking at the held-out half: the highest APGR on the tuning half
        tuned_apgr = {k: v["tune_apgr"] for k, v in res["signals"].items() if not math.isnan(v["tune_apgr"])}
        res["best_signal_by_tuning"] = max(tuned_apgr, key=tuned_apgr.get) if tuned_apgr else None
        out["tasks"][name] = res
    return out


def table(result: dict) -> str:
    def pct(x: float) -> str:
        return "-" if x != x else f"{x:.0%}"

    lines = []
    for name, r in result["tasks"].items():
        lines.append(f"\n**{name}** — held-out n={r['n_heldout']} (tuning n={r['n_tune']}): small {r['small_acc']:.3f}, "
                     f"large {r['large_acc']:.3f}, oracle {r['oracle_acc']:.3f} (tuning half: small {r['tune_small_acc']:.3f}, "
                     f"large {r['tune_large_acc']:.3f}); latency/query small {r['latency_s']['small']:.3f} s, "
                     f"large {r['latency_s']['large']:.3f} s; best signal on held-out {r['best_signal']}, "
                     f"chosen on the tuning half {r['best_signal_by_tuning']}\n")
        lines.append("| signal | " + " | ".join(f"@{k}" for k in r["random"]["curve"]) + " | APGR | CPT(98 %) | CPT(50 % PGR) | "
                     "98 % cut (tuned) → held-out esc. / acc | max-acc cut (tuned) → held-out esc. / acc | latency s |")
        lines.append("|---" * (len(RATES) + 7) + "|")
        for sig, s in [*r["signals"].items(), ("random", r["random"])]:
            cells = " | ".join(f"{v:.3f}" for v in s["curve"].values())
            t, b = s.get("tuned"), s.get("max_accuracy")
            t98 = f"{t['heldout_escalation']:.0%} / {t['heldout_accuracy']:.3f}" if t else "-"
            tmax = f"{b['heldout_escalation']:.0%} / {b['heldout_accuracy']:.3f}" if b else "-"
            apgr = "-" if s["apgr"] != s["apgr"] else f"{s['apgr']:.3f}"
            lat = s.get("cascade_latency_s")
            lines.append(f"| {sig} | {cells} | {apgr} | {pct(s['cpt98'])} | {pct(s.get('cpt50_pgr', float('nan')))} | {t98} | "
                         f"{tmax} | {'-' if lat is None else f'{lat:.3f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--piqa", type=int, default=300)
    ap.add_argument("--hellaswag", type=int, default=120)
    ap.add_argument("--budget-s", type=float, default=420, help="stop scoring after this long (re-run to continue)")
    ap.add_argument("--cache", default=os.environ.get("SLIMLM_ROUTE_CACHE", "/work/cache/serve-route"))
    ap.add_argument("--out", default="benchmarks/results/route.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sizes = {"piqa": args.piqa, "hellaswag": args.hellaswag}
    if not score(cache, sizes, args.budget_s):
        print("budget used up; run again to continue scoring", file=sys.stderr)
        return
    result = analyse(cache, sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
