"""``slimlm tasks MODEL --tasks hellaswag,piqa,blimp --limit N``: multiple-choice, generation and
perplexity tasks through the lm-eval-style model interface; rows go to the results store."""

from __future__ import annotations

import argparse
import json

from slimlm.config import int_at_least
from slimlm.devices import add_device_args
from slimlm.errors import SlimlmError


def cmd_tasks(args: argparse.Namespace) -> None:
    from slimlm.eval.tasks import builtin_tasks, load_task, task_rows
    from slimlm.models import load
    from slimlm.results import append_rows

    refs = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not refs:
        raise SlimlmError("no tasks given", f"pass --tasks with one or more of: {', '.join(builtin_tasks())}")
    for ref in refs:  # unknown or malformed tasks fail before the model loads
        load_task(ref)
    lm = load(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    rows = task_rows(lm, refs, limit=args.limit, seed=args.seed, label=args.label, batch_tokens=args.batch_tokens)
    path = append_rows(rows, args.results)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return
    print(f"{'task':<14} {'n':>6} {'metric':<16} {'value':>8} {'± stderr':>9}")
    for r in rows:
        for k, v in r.items():
            if k in {"acc", "acc_norm", "exact_match", "contains", "token_perplexity", "word_perplexity", "bits_per_byte"}:
                err = r.get(f"{k}_stderr")
                print(f"{r['task']:<14} {r['n']:>6} {k:<16} {v:>8.4f} {'' if err is None else f'{err:>9.4f}'}")
    print(f"\nresults appended to {path} (and its .db)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="multiple-choice / generation / perplexity tasks (HellaSwag, PIQA, BLiMP, your JSONL)")
    p.add_argument("model", help="`default`, a local HF folder, a .gguf file, or a slimlm artifact")
    p.add_argument("--tasks", required=True, help="comma-separated: builtin names, task .yaml paths, or NAME=FILE.jsonl")
    p.add_argument("--limit", type=int_at_least(1), default=None, help="evaluate at most N documents per task")
    p.add_argument("--seed", type=int_at_least(0), default=None, help="sample the N documents with this seed (default: the first N)")
    p.add_argument("--label", default=None, help="model name in the results (default: the model path)")
    p.add_argument("--batch-tokens", type=int_at_least(1), default=4096, help="tokens per forward batch")
    p.add_argument("--results", default=None, help="results JSONL to append to (a .db beside it is the store)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints")
    p.add_argument("--json", action="store_true", help="print one JSON object per task")
    add_device_args(p)
    p.set_defaults(func=cmd_tasks)
