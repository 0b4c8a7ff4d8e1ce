"""``slimlm results [--model M] [--task T] [--metric X] [--json]``: list rows of the results store."""

from __future__ import annotations

import argparse
import json


def cmd_results(args: argparse.Namespace) -> None:
    from slimlm.store import ResultsStore

    store = ResultsStore(args.db)
    rows = store.query(model=args.model, task=args.task, metric=args.metric)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"{'timestamp':<20} {'model':<32} {'task':<20} {'metric':<24} {'value':>14}")
    for r in rows:
        print(f"{r['timestamp']:<20} {str(r['model'])[-32:]:<32} {r['task'][:20]:<20} {r['metric'][:24]:<24} {r['value']:>14.6g}")
    print(f"\n{len(rows)} rows in {store.path}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="list and filter the results store (SQLite)")
    p.add_argument("--model", default=None, help="model label (SQL LIKE pattern: %% matches anything)")
    p.add_argument("--task", default=None, help="task name (LIKE pattern)")
    p.add_argument("--metric", default=None, help="metric name (LIKE pattern)")
    p.add_argument("--db", default=None, help="database file (default $SLIMLM_RESULTS_DB or slimlm-results/results.db)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.set_defaults(func=cmd_results)
