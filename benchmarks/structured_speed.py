"""Decode and prefill speed of structurally compressed SmolLM2-135M, side by side in one run.

Variants: dense; layer_drop 25% of blocks; width −25% params; asvd at 80% of each layer's params.
Each variant's *compute share removed* is 1 − (multiply-adds per token of every linear, lm_head
included) / dense; the target is a tok/s gain of at least that share minus 10 percentage points.
Models are measured in interleaved rounds (one greedy run each per round, median over rounds) so
that load from other processes on a shared machine hits every variant alike.

    .venv/bin/python benchmarks/structured_speed.py [--rounds 5] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import slimlm
from slimlm.eval import efficiency

VARIANTS = {
    "dense": None,
    "layer_drop 25%": "layer_drop: {fraction: 0.25}",
    "width -25%": "width: {param_reduction: 0.25}",
    "asvd 80%": "asvd: {param_ratio: 0.8}",
}


def macs_per_token(model: nn.Module) -> int:
    """Multiply-adds of every nn.Linear for one token (attention scores excluded: short prompts)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--calib", default="{n_samples: 16, seqlen: 128}", help="calibration mapping for the recipes")
    ap.add_argument("--threads", type=int, help="torch threads (1 is far steadier on a shared, busy machine)")
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models: dict[str, slimlm.LoadedModel] = {}
    build_s: dict[str, float] = {}
    for name, step in VARIANTS.items():
        t0 = time.perf_counter()
        lm = slimlm.load("default")
        if step is not None:
            lm = slimlm.compress(lm, f"calibration: {args.calib}\nsteps:\n  - {step}\n").model
        models[name] = lm
        build_s[name] = time.perf_counter() - t0
        print(f"built {name} in {build_s[name]:.0f} s", flush=True)

    samples: dict[str, list[dict]] = {n: [] for n in models}
    for r in range(args.rounds):
        for name, lm in models.items():
            samples[name].append(efficiency(lm, new_tokens=args.new_tokens, repeats=1))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    dense_macs = macs_per_token(models["dense"].model)
    rows = []
    for name, lm in models.items():
        dec = statistics.median(s["decode_tok_s"] for s in samples[name])
        pre = statistics.median(s["prefill_tok_s"] for s in samples[name])
        rows.append({"variant": name, "params": lm.info.n_params, "compute_removed": 1 - macs_per_token(lm.model) / dense_macs,
                     "decode_tok_s": dec, "prefill_tok_s": pre, "build_s": build_s[name]})
    base = rows[0]
    print(f"\nthreads={torch.get_num_threads()} rounds={args.rounds} new_tokens={args.new_tokens} (medians)")
    print(f"{'variant':16} {'params':>11} {'compute -':>9} {'decode tok/s':>12} {'gain':>7} {'prefill tok/s':>13} {'gain':>7}  target")
    for row in rows:
        row["decode_gain"] = row["decode_tok_s"] / base["decode_tok_s"] - 1
        row["prefill_gain"] = row["prefill_tok_s"] / base["prefill_tok_s"] - 1
        row["target_met"] = row["decode_gain"] >= row["compute_removed"] - 0.10
        print(f"{row['variant']:16} {row['params']:>11,} {row['compute_removed']:>9.1%} {row['decode_tok_s']:>12.1f} "
              f"{row['decode_gain']:>+7.1%} {row['prefill_tok_s']:>13.1f} {row['prefill_gain']:>+7.1%}  "
              f"{'met' if row['target_met'] else 'missed'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rounds": args.rounds, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
