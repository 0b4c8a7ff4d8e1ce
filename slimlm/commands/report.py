"""``slimlm report [--out FILE.html]``: self-contained HTML leaderboard with Pareto plots."""

from __future__ import annotations

import argparse


def cmd_report(args: argparse.Namespace) -> None:
    from slimlm.report import build_report

    out = build_report(args.out, db=args.db, artifacts=args.artifact or [], routes=args.route or [])
    print(f"report written to {out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="HTML leaderboard, Pareto plots and per-layer errors from the results store")
    p.add_argument("--out", default="slimlm-results/report.html", help="HTML file to write")
    p.add_argument("--db", default=None, help="results database (default $SLIMLM_RESULTS_DB or slimlm-results/results.db)")
    p.add_argument("--artifact", action="append", help="also chart this artifact's per-layer errors (repeatable)")
    p.add_argument("--route", action="append", help="add the cascade cost/quality curves of a benchmarks/route.py JSON (repeatable)")
    p.set_defaults(func=cmd_report)
