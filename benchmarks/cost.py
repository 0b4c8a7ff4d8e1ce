"""Cost table for the default model: fp (fp32) vs RTN-8 (per channel) vs RTN-4 (g128), via ``slimlm cost``'s API.

    .venv/bin/python benchmarks/cost.py [--threads 2] [--new-tokens 32]
Artifacts are written under slimlm-out/bench-cost so bytes on disk and compression ratios are real.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import slimlm
from slimlm.eval.cost import cost
from slimlm.results import append_rows, run_metadata

RECIPES = {"rtn8": "steps:\n  - rtn: {bits: 8, group_size: -1}\n", "rtn4-g128": "steps:\n  - rtn: {bits: 4, group_size: 128}\n"}
COLS = [("weight MB", "weight_bytes_in_memory", 1e-6), ("disk MB", "bytes_on_disk", 1e-6), ("ratio", "compression_ratio", 1),
        ("TTFT s", "ttft_s", 1), ("s/token", "time_per_output_token_s", 1), ("decode tok/s", "decode_tok_s", 1),
        ("b1 tok/s", "throughput_b1_tok_s", 1), ("b4 tok/s", "throughput_b4_tok_s", 1), ("b16 tok/s", "throughput_b16_tok_s", 1),
        ("peak RSS MB", "peak_rss_bytes", 1e-6), ("CPU %", "cpu_util_pct", 1), ("J/token", "j_per_token", 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="slimlm-out/bench-cost")
    args = ap.parse_args()
    rows = []
    for label in ("fp", *RECIPES):
        if label == "fp":
            lm = slimlm.load("default")
        else:
            folder = Path(args.out) / label
            if not folder.exists():
                slimlm.compress("default", RECIPES[label], folder)
            lm = slimlm.load(folder)
        row = cost(lm, threads=args.threads, new_tokens=args.new_tokens)
        rows.append({"kind": "cost", "task": "cost", "model": f"default/{label}", "recipe": lm.info.recipe, **row, **run_metadata()})
        print(label, json.dumps({k: row[k] for _, k, _ in COLS if k in row}), flush=True)
        del lm
    append_rows(rows)
    print("\n| model | " + " | ".join(c for c, _, _ in COLS) + " |")
    print("|---" * (len(COLS) + 1) + "|")
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{r[k] * s:.3g}" if r.get(k) is not None else "-" for _, k, s in COLS) + " |")
    print(f"\nenergy: {rows[0]['energy_source']}" + (f" ({rows[0]['watts_per_core']} W/core × CPU-seconds)" if rows[0]["energy_source"] == "estimated" else "")
          + f"; threads {rows[0]['threads']}")


if __name__ == "__main__":
    main()
