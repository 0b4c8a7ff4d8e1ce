"""``slimlm bench MATRIX.yaml [--backend ray [--address ADDR]]``: models × recipes × tasks, resumable."""

from __future__ import annotations

import argparse


def cmd_bench(args: argparse.Namespace) -> None:
    from slimlm.bench import run_bench

    res = run_bench(args.matrix, backend=args.backend, address=args.address, workers=args.workers, results=args.results)
    print(f"bench: {res['done']} task runs done, {res['skipped']} already in the store, {res['seconds']} s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a models × recipes × tasks matrix from YAML (skips rows already stored)")
    p.add_argument("matrix", help="YAML with models:, recipes:, tasks: (see docs/evaluation.md)")
    p.add_argument("--backend", choices=("local", "ray"), default="local", help="ray: one worker process per cell")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--results", default=None, help="results JSONL (its .db beside it is the store checked for skips)")
    p.set_defaults(func=cmd_bench)
