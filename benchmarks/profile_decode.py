"""Where a decode token's time goes: torch.profiler over single-token engine forwards, top ops by self CPU time.

    .venv/bin/python benchmarks/profile_decode.py ARTIFACT        # e.g. an RTN-4 g64 artifact of the default model

Prefills a 128-token random prompt, times 40 single-token forwards (ms/token), then profiles 10.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import slimlm
from slimlm.runtime.engine import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25, help="ops to list")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eng = Engine(slimlm.load(a.model), max_seq=512)
    eng.reset(1)
    eng.forward(torch.randint(0, eng.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0)))
    tok = torch.tensor([[5]])
    for _ in range(10):
        eng.forward(tok)
    n, t = 40, time.perf_counter()
    for _ in range(n):
        eng.forward(tok)
    print(f"{(time.perf_counter() - t) / n * 1e3:.2f} ms/token ({a.threads} threads, kernels: {sorted(set(eng.paths))})")
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(10):
            eng.forward(tok)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
