"""Reproduce the demo's figures at a larger evaluation budget: fp32 vs RTN-8 vs RTN-4 g128.

    .venv/bin/python benchmarks/demo.py [--max-tokens 20000] [--data auto]

Each model is evaluated in this one process, side by side: WikiText-2 test perplexity (512-token
windows; Shakespeare held-out plays when the data folder is absent), size on disk, weight bytes in
memory, time to first token and decode tokens/s (median of 3). JSON goes to
benchmarks/results/demo.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from slimlm.cli import print_table
from slimlm.compress import compress
from slimlm.demo import DEMO_RECIPES
from slimlm.eval.run import evaluate, resolve_eval_source
from slimlm.models import load
from slimlm.recipe import Recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--data", default="auto")
    ap.add_argument("--out", default="benchmarks/results/demo.json")
    args = ap.parse_args()
    source = resolve_eval_source(args.data)
    rows = evaluate(load("default"), data=source, max_tokens=args.max_tokens, label="fp32", progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in DEMO_RECIPES.items():
            compress("default", Recipe.from_yaml(text), Path(tmp) / name)
            rows += evaluate(load(Path(tmp) / name), data=source, max_tokens=args.max_tokens, label=name, progress=False)
    fp = rows[0]
    print(f"data: {source}, first {fp['tokens']} scored tokens, window {fp['window']}\n")
    print_table(rows)
    by = {r["model"]: r for r in rows if r["kind"] == "quality"}
    size = {r["model"]: r for r in rows if r["kind"] == "efficiency"}
    print()
    for name in DEMO_RECIPES:
        print(f"{name}: ppl ratio {by[name]['perplexity'] / by['fp32']['perplexity']:.4f}, "
              f"disk ratio {size[name]['bytes_on_disk'] / size['fp32']['bytes_on_disk']:.4f}, "
              f"decode speed ratio {size[name]['decode_tok_s'] / size['fp32']['decode_tok_s']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
