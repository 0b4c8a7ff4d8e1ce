"""``slimlm cost MODEL``: every cost figure (latency, throughput, memory, size, compression, CPU, energy)."""

from __future__ import annotations

import argparse
import json


def cmd_cost(args: argparse.Namespace) -> None:
    from slimlm.eval.cost import cost
    from slimlm.models import load
    from slimlm.results import append_rows, run_metadata

    lm = load(args.model, allow_pickle=args.allow_pickle)
    batches = tuple(int(b) for b in args.batches.split(","))
    row = cost(lm, threads=args.threads, batch_sizes=batches, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
               watts_per_core=args.watts_per_core)
    meta = run_metadata()  # after pinning, so the recorded thread count is the one used
    row = {"kind": "cost", "task": "cost", "model": args.label or lm.info.source, "source_hash": lm.info.source_hash,
           "source_kind": lm.info.source_kind, "recipe": lm.info.recipe, **row, **meta}
    path = append_rows([row], args.results)
    if args.json:
        print(json.dumps(row, default=str))
        return
    for k, v in row.items():
        if k not in meta and k not in {"recipe", "source_hash"}:
            print(f"{k:<26} {v:.4g}" if isinstance(v, float) else f"{k:<26} {v}")
    print(f"\nresults appended to {path} (and its .db)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="TTFT, tok/s, batched throughput, RSS, size, compression, CPU %%, energy (J/token)")
    p.add_argument("model", help="`default`, a local HF folder, a .gguf file, or a slimlm artifact")
    p.add_argument("--threads", type=int, default=None, help="pin torch to N threads (default: torch's choice)")
    p.add_argument("--batches", default="1,4,16", help="batch sizes for the throughput measurement")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--watts-per-core", type=float, default=10.0, help="for the energy estimate when RAPL is not readable")
    p.add_argument("--label", default=None, help="model name in the results")
    p.add_argument("--results", default=None, help="results JSONL to append to (a .db beside it is the store)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cost)
