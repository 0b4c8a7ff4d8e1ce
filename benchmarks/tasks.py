"""Zero-shot HellaSwag / PIQA / BLiMP on the default model, fp vs RTN-4 g128, against published numbers.

Full run (the issue's sizes; hours on a 2-core CPU):
    .venv/bin/python benchmarks/tasks.py --hellaswag 500 --piqa 1838 --blimp-per 200
Published SmolLM2-135M (base model, lm-eval zero-shot acc_norm): HellaSwag ~42.1, PIQA ~68.4. Our
default model is the *Instruct* variant, dequantized from a Q4_1 GGUF, so expect a few points less.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import slimlm
from slimlm.eval.tasks import task_rows
from slimlm.results import append_rows

PUBLISHED = {"hellaswag": 42.1, "piqa": 68.4}  # SmolLM2-135M base, HF model card (lm-eval, zero-shot, acc_norm)
RTN4 = "steps:\n  - rtn: {bits: 4, group_size: 128}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hellaswag", type=int, default=200, help="first N HellaSwag items")
    ap.add_argument("--piqa", type=int, default=300, help="first N PIQA items (1838 = all)")
    ap.add_argument("--blimp-per", type=int, default=50, help="pairs per BLiMP phenomenon (10 phenomena)")
    ap.add_argument("--only", default=None, help="comma-separated model/task cells to run, e.g. rtn4-g128/piqa "
                    "(the others are read back from --out, so an interrupted run can be finished)")
    ap.add_argument("--out", default="slimlm-results/bench-tasks.json")
    args = ap.parse_args()
    refs = {"hellaswag": args.hellaswag, "piqa": args.piqa, "blimp": 10 * args.blimp_per}
    out = Path(args.out)
    done = json.loads(out.read_text()) if args.only and out.is_file() else {}
    table = {tuple(k.split("/")): v for k, v in done.items()}
    wanted = set(args.only.split(",")) if args.only else None
    for label in ("fp", "rtn4-g128"):
        todo = [t for t in refs if wanted is None or f"{label}/{t}" in wanted]
        if not todo:
            continue
        lm = slimlm.load("default")
        if label != "fp":
            lm = slimlm.compress(lm, RTN4).model
        for task in todo:
            n = refs[task]
            t0 = time.time()
            rows = task_rows(lm, [task], limit=n, label=f"default/{label}")
            append_rows(rows)
            table[(label, task)] = rows[0]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in table.items()}, indent=1, default=str))
            print(f"{label:<10} {task:<10} n={rows[0]['n']:<5} acc={rows[0]['acc']:.4f} "
                  f"acc_norm={rows[0].get('acc_norm', float('nan')):.4f} ({time.time() - t0:.0f}s)", flush=True)
    print("\n| task | n | fp acc | fp acc_norm | RTN-4 g128 acc | RTN-4 g128 acc_norm | published acc_norm (base) |")
    print("|---|---|---|---|---|---|---|")
    for task in refs:
        fp, q = table[("fp", task)], table[("rtn4-g128", task)]
        pub = PUBLISHED.get(task)
        print(f"| {task} | {fp['n']} | {100 * fp['acc']:.1f} | {100 * fp.get('acc_norm', float('nan')):.1f} | "
              f"{100 * q['acc']:.1f} | {100 * q.get('acc_norm', float('nan')):.1f} | {pub if pub else '-'} |")


if __name__ == "__main__":
    main()
