"""``slimlm trust MODEL [--against BASE] [--suite all|truthfulness,bias,robustness,privacy] [--n N]``:
truthfulness (TruthfulQA MC1/MC2), bias (CrowS-Pairs), robustness (perturbed PIQA/HellaSwag) and
privacy leakage (membership inference, canary exposure), each with standard errors; against a base
model also paired deltas and a flag where a metric degrades while perplexity does not."""

from __future__ import annotations

import argparse
import json
import math


def cmd_trust(args: argparse.Namespace) -> None:
    from slimlm.models import load
    from slimlm.results import append_rows
    from slimlm.trust.privacy import read_canaries
    from slimlm.trust.run import parse_suites, run_trust, trust_rows
    from slimlm.trust.spec import suite_tasks

    suites = parse_suites(args.suite)
    suite_tasks(suites)  # bad task files fail before any model loads
    privacy = {"source": args.privacy_data, "seq_len": args.seq_len, "n": args.privacy_windows,
               "canaries": read_canaries(args.canaries) if args.canaries else None}
    kw = dict(n=args.n, seed=args.seed, privacy=privacy, batch_tokens=args.batch_tokens, ppl_tokens=args.ppl_tokens)
    base = None
    if args.against:
        base_lm = load(args.against, allow_pickle=args.allow_pickle)
        base = run_trust(base_lm, suites, label=args.against, **kw)
        append_rows(trust_rows(base_lm, base), args.results)
        del base_lm
    lm = load(args.model, allow_pickle=args.allow_pickle)
    run = run_trust(lm, suites, label=args.label or args.model, **kw)
    rows = trust_rows(lm, run, base, args.against)
    path = append_rows(rows, args.results)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
        return
    print(f"{'task':<24} {'metric':<28} {'value':>8} {'± se':>7}" + (f" {'Δ vs base':>10} {'± se':>7}  flag" if base else ""))
    for r in rows:
        for k, v in r.items():
            if f"{k}_stderr" not in r:
                continue
            line = f"{r['task']:<24} {k:<28} {v:>8.4f} {r[f'{k}_stderr']:>7.4f}"
            if f"{k}_delta" in r:
                flag = "hidden" if r[f"{k}_hidden"] else "worse" if r[f"{k}_degraded"] else ""
                se = r[f"{k}_delta_stderr"]
                line += f" {r[f'{k}_delta']:>+10.4f} {se if math.isfinite(se) else float('nan'):>7.4f}  {flag}"
            print(line)
    print(f"\nresults appended to {path} (and its .db); `slimlm report` shows them as the trust card")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trust", help="truthfulness, bias, robustness and privacy leakage, optionally against a base model")
    p.add_argument("model", help="`default`, `gemma3-270m`, a local HF folder, a .gguf file, or a slimlm artifact")
    p.add_argument("--against", default=None, help="base model to compare with, paired on the same items")
    p.add_argument("--suite", default="all", help="all, or a comma list of truthfulness,bias,robustness,privacy")
    p.add_argument("--n", type=int, default=None, help="items per task (default: every item)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item sample (with --n)")
    p.add_argument("--label", default=None, help="model name in the results (default: the model path)")
    p.add_argument("--privacy-data", default="shakespeare", help="text source the model was trained on (membership inference)")
    p.add_argument("--privacy-windows", type=int, default=64, help="training and held-out windows for membership inference")
    p.add_argument("--seq-len", type=int, default=128, help="membership-inference window length")
    p.add_argument("--canaries", default=None, help="JSON list of {prefix, secret} planted in the training text (exposure)")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="perplexity tokens (the reference for the `hidden` flag)")
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch")
    p.add_argument("--results", default=None, help="results JSONL to append to (a .db beside it is the store)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints")
    p.add_argument("--json", action="store_true", help="print one JSON object per task")
    p.set_defaults(func=cmd_trust)
