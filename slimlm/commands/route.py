"""``slimlm route tune ROUTER.yaml --dev DEV.jsonl``: fit the cascade's thresholds to a quality target."""

from __future__ import annotations

import argparse


def _tiers(cfg, max_seq: int):
    """Local tiers on their own engines (greedy, one at a time), remote tiers over HTTP."""
    from slimlm.models import load
    from slimlm.route.tiers import DirectBackend, LocalTier, RemoteTier
    from slimlm.runtime.engine import Engine

    out = []
    for t in cfg.tiers:
        if t.remote:
            out.append(RemoteTier(t.name, t.url, t.remote_model, t.api_key(), t.timeout_s))
        else:
            out.append(LocalTier(t.name, DirectBackend(Engine(load(t.model), max_batch=max(cfg.samples, 1), max_seq=max_seq))))
    return out


def cmd_tune(args: argparse.Namespace) -> None:
    from slimlm.errors import SlimlmError
    from slimlm.route.cascade import make_scorer
    from slimlm.route.config import load_router, save_router
    from slimlm.route.devset import answer_items, read_dev, scored_item, tune_router
    from slimlm.route.signals import SIGNALS

    if not 0 < args.target <= 1.5:
        raise SlimlmError(f"--target {args.target} is not a ratio", "pass e.g. --target 0.98 (98 % of the last tier's accuracy)")
    if args.signal not in ("auto", "learned"):
        SIGNALS.get(args.signal)  # unknown names fail before any model loads
    cfg = load_router(args.router)
    rows = read_dev(args.dev)
    if all("tiers" in r for r in rows):
        items = [scored_item(r, len(cfg.tiers), f"{args.dev}, line {r['_line']}") for r in rows]
    else:
        probe = cfg.model_copy(update={"signal": "lp_q10" if args.signal in ("auto", "learned") else args.signal})
        _, need = make_scorer(probe)
        need.entropies, need.samples = True, cfg.samples  # every signal's evidence, so `auto` can compare them
        items = answer_items(rows, _tiers(cfg, args.max_seq), need, args.max_new_tokens)
    new, res, report = tune_router(cfg, items, signal=args.signal, ratio=args.target)
    out = save_router(new, args.out or args.router)
    for sig, r in sorted(report.items(), key=lambda kv: (not kv[1]["met"], kv[1]["cost"])):
        apgr = "-" if r["apgr"] is None else f"{r['apgr']:.3f}"
        print(f"{sig:<12} met={str(r['met']):<5} acc={r['accuracy']:.4f} escalation={r['escalation']:.3f} apgr={apgr}")
    status = "reached" if res.met else "NOT reached (most accurate setting written)"
    print(f"\n{new.signal}: accuracy {res.accuracy:.4f} vs target {res.target_accuracy:.4f} ({status}), "
          f"escalation {res.escalation:.1%}; thresholds {[round(t, 4) for t in res.thresholds]} → {out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("route", help="cascade routers: tune thresholds on a labelled dev set")
    rsub = p.add_subparsers(dest="route_command", required=True)
    t = rsub.add_parser("tune", help="fit thresholds for a quality target and write router.yaml")
    t.add_argument("router", help="router YAML (tiers, signal, privacy; see docs/serving.md)")
    t.add_argument("--dev", required=True, help="labelled JSONL: {prompt|messages, answer} or pre-scored {tiers: [...]}")
    t.add_argument("--target", type=float, default=0.98, help="accuracy to reach, as a fraction of the last tier's")
    t.add_argument("--signal", default="auto", help="a signal name, `learned`, or `auto` (best of all)")
    t.add_argument("--out", default=None, help="where to write the tuned router (default: overwrite ROUTER)")
    t.add_argument("--max-new-tokens", type=int, default=64, help="answer length when the tiers answer the dev prompts")
    t.add_argument("--max-seq", type=int, default=1024, help="context length of local tiers")
    t.set_defaults(func=cmd_tune)
