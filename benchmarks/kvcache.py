"""KV-cache quantization on the default model: bytes held at 2k context and perplexity through the cache.

    .venv/bin/python benchmarks/kvcache.py [--context 2048] [--prefix 1024] [--chunk 128] [--windows 1]

For each window of ``context`` WikiText-2 test tokens (from the start of the split): feed the first
``prefix`` tokens, then score the remaining ones ``chunk`` tokens at a time through the cache, so
every scored token attends only to cached K/V (quantized for int8/int4). Memory is the bytes the
cache object holds at the end of the window (codes + scales; fp32 tensors for the reference).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import slimlm
from slimlm.data import encode, load_text
from slimlm.results import append_rows, run_metadata
from slimlm.runtime import cached_perplexity

CONFIGS = {"fp32": (None, None), "int8-g64": (8, 64), "int4-g64": (4, 64), "int4-g32": (4, 32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/kvcache.json", help="results JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = slimlm.load("default")
    ids = encode(lm.tokenizer, load_text("wikitext2", "eval"))
    rows = []
    for label, (bits, group) in CONFIGS.items():
        nll, count, held, t0 = 0.0, 0, 0, time.perf_counter()
        for w in range(args.windows):
            window = ids[w * args.context : (w + 1) * args.context]
            r = cached_perplexity(lm.model, window, prefix=args.prefix, chunk=args.chunk, kv_bits=bits, group_size=group)
            nll += r["nll"] * r["tokens"]
            count += r["tokens"]
            held = max(held, r["kv_bytes"])
        row = {"kind": "kvcache", "task": "wikitext2-cached-ppl", "model": "default", "kv": label, "kv_bits": bits,
               "group_size": group, "context": args.context, "prefix": args.prefix, "chunk": args.chunk,
               "windows": args.windows, "scored_tokens": count, "perplexity": math.exp(nll / count),
               "kv_bytes": held, "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print(f"\n{'kv':10} {'ppl':>8} {'Δppl':>7} {'KV MB':>8} {'× fp32':>7}")
    for r in rows:
        print(f"{r['kv']:10} {r['perplexity']:8.3f} {r['perplexity'] / base['perplexity'] - 1:+7.2%} "
              f"{r['kv_bytes'] / 1e6:8.2f} {r['kv_bytes'] / base['kv_bytes']:7.3f}")
    append_rows([{**r, **run_metadata()} for r in rows])
    with open(args.out, "w") as f:
        json.dump({"meta": run_metadata(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
