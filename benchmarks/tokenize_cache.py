"""Time of tokenizing the Shakespeare calibration split and WikiText-2 test, first call vs. cached call.

    PYTHONPATH=. python benchmarks/tokenize_cache.py   # → benchmarks/results/tokenize_cache.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import slimlm
from slimlm.data import encode, load_text


def main() -> None:
    torch.set_num_threads(2)
    tok = slimlm.load("default").tokenizer
    again = slimlm.load("default").tokenizer  # a second load: another object, the same key
    rows = []
    for source, split in (("shakespeare", "calib"), ("wikitext2", "eval")):
        text = load_text(source, split)
        t0 = time.perf_counter()
        ids = encode(tok, text)
        t1 = time.perf_counter()
        hit = encode(again, text)
        t2 = time.perf_counter()
        assert torch.equal(ids, hit)
        rows.append({"source": source, "split": split, "chars": len(text), "tokens": len(ids),
                     "first_s": round(t1 - t0, 3), "cached_s": round(t2 - t1, 4)})
        print(rows[-1])
    out = Path(__file__).parent / "results" / "tokenize_cache.json"
    out.write_text(json.dumps({"machine": platform.platform(), "threads": 2, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
