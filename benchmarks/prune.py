"""Pruning and low-rank side by side on SmolLM2-135M: WikiText-2 perplexity, parameters, bytes on disk, decode tok/s.

Rows: dense; magnitude / Wanda / SparseGPT at 50 % unstructured and 2:4; SparseGPT 2:4 + int4 (joint
mode); and, when registered, layer_drop 25 %, width −25 % params, svd and asvd at 80 % params, and one
chained recipe (layer drop → Wanda 2:4 → GPTQ 4-bit, else Wanda 2:4 → RTN 4-bit). Every compressed
row is saved as an artifact (bytes on disk = its model.safetensors) and measured in memory (the
reloaded artifact gives identical logits, see tests/test_sparse_storage.py). Perplexity: WikiText-2
test, first ``--max-tokens`` tokens, 512-token windows. Calibration: ``--calib`` (WikiText-2 v1
*validation* split by default, never the test split). One model in memory at a time.

    .venv/bin/python benchmarks/prune.py [--max-tokens 4096] [--threads 1] [--calib "{source: wikitext2, n_samples: 16, seqlen: 256}"]

Writes ``benchmarks/results/prune.json`` and ``benchmarks/results/prune.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import slimlm
from slimlm.artifact import save_artifact
from slimlm.data import load_text
from slimlm.eval import efficiency, perplexity
from slimlm.methods import METHODS
from slimlm.models.load import count_params
from slimlm.results import run_metadata

RESULTS = Path(__file__).parent / "results"
GPTQ4 = "{bits: 4, group_size: 128, symmetric: true}"  # g128 symmetric: SmolLM2's own grid is 4-bit g32 asymmetric


def variants(have: set[str]) -> dict[str, list[str] | None]:
    """Label → recipe steps (YAML flow mappings); colleagues' methods only where registered."""
    rows: dict[str, list[str] | None] = {"dense": None}
    for method in ("magnitude", "wanda", "sparsegpt"):
        rows[f"{method} 50%"] = [f"{method}: {{sparsity: 0.5}}"]
        rows[f"{method} 2:4"] = [f"{method}: {{n: 2, m: 4}}"]
    rows["sparsegpt 2:4 + int4 (joint)"] = ["sparsegpt: {n: 2, m: 4, bits: 4, group_size: 128, symmetric: true}"]
    optional = {"layer_drop 25%": "layer_drop: {fraction: 0.25}", "width -25% params": "width: {param_reduction: 0.25}",
                "svd 80% params": "svd: {param_ratio: 0.8}", "asvd 80% params": "asvd: {param_ratio: 0.8}"}
    for label, step in optional.items():
        if step.split(":")[0] in have:
            rows[label] = [step]
    if {"layer_drop", "gptq"} <= have:
        rows["chain: layer_drop 3 → wanda 2:4 → gptq 4-bit"] = ["layer_drop: {n: 3}", "wanda: {n: 2, m: 4}", f"gptq: {GPTQ4}"]
    else:
        rows["chain: wanda 2:4 → rtn 4-bit"] = ["wanda: {n: 2, m: 4}", f"rtn: {GPTQ4}"]
    return rows


@torch.no_grad()
def csr_vs_dense_us(weight: torch.Tensor, repeats: int = 50) -> dict[str, float]:
    """One-token (decode) matmul with a pruned weight: dense F.linear vs torch.sparse CSR, µs per call."""
    x = torch.randn(1, weight.shape[1])
    csr = weight.to_sparse_csr()

    def clock(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e6

    return {"shape": list(weight.shape), "density": float((weight != 0).float().mean()),
            "dense_us": clock(lambda: F.linear(x, weight)), "csr_us": clock(lambda: csr @ x.T)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | ppl | ratio | params (M) | disk (MB) | disk vs dense | decode tok/s | build s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['perplexity']:.2f} | {r['ppl_ratio']:.3f} | {r['params'] / 1e6:.1f} | "
                     f"{r['bytes_on_disk'] / 1e6:.1f} | {r['disk_ratio']:.3f} | {r['decode_tok_s']:.1f} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def merge(stems: list[str], name: str) -> None:
    """Combine runs split with ``--only`` (same settings, shared dense reference) into one table."""
    runs = [json.loads((RESULTS / f"{stem}.json").read_text()) for stem in stems]
    order = list(variants(set(METHODS.names())))
    unique = {}
    for r in (r for run in runs for r in run["rows"]):
        unique.setdefault(r["variant"], r)  # a variant measured twice keeps its first run
    rows = sorted(unique.values(), key=lambda r: order.index(r["variant"]))
    out = {"settings": runs[0]["settings"], "meta": runs[0]["meta"], "runs": [run["settings"] for run in runs],
           "rows": rows, **{k: v for run in runs for k, v in run.items() if k == "csr_vs_dense"}}
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(table(rows) + "\n")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=4096, help="WikiText-2 test tokens scored (512-token windows)")
    ap.add_argument("--calib", default="{source: wikitext2, n_samples: 16, seqlen: 256}", help="calibration mapping")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per decode-speed run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 avoids spin contention on a busy shared CPU")
    ap.add_argument("--only", help="comma-separated variant labels to run (default: all)")
    ap.add_argument("--reference", help="take the dense row from this earlier prune.json instead of measuring it")
    ap.add_argument("--name", default="prune", help="results file stem under benchmarks/results/")
    ap.add_argument("--merge", help="comma-separated result stems (runs split with --only) to combine into --name")
    args = ap.parse_args()

    if args.merge:
        return merge(args.merge.split(","), args.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = load_text("wikitext2", "eval")
    plan = variants(set(METHODS.names()))
    if args.only:
        plan = {k: v for k, v in plan.items() if k == "dense" or k in set(args.only.split(","))}  # dense: the reference
    dense_ppl = dense_bytes = None
    if args.reference:
        ref = next(r for r in json.loads(Path(args.reference).read_text())["rows"] if r["variant"] == "dense")
        dense_ppl, dense_bytes = ref["perplexity"], ref["bytes_on_disk"]
        del plan["dense"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="slimlm-prune-bench-"))
    out: dict[str, Any] = {"settings": {"model": "default (SmolLM2-135M)", "eval": "wikitext2 test", "window": 512,
                                        "max_tokens": args.max_tokens, "calibration": args.calib,
                                        "decode": f"greedy, 128-token prompt, {args.new_tokens} new tokens, median of 3",
                                        "storage_dtype": "float16", "threads": torch.get_num_threads()},
                           "meta": run_metadata(), "rows": []}
    try:
        for label, steps in plan.items():
            t0 = time.perf_counter()
            lm = slimlm.load("default")
            folder = work / label.replace(" ", "_").replace("/", "_")
            if steps is None:
                save_artifact(lm, folder, recipe_yaml="steps: []\n", storage_dtype="float16", report={})
                lm.info.weights_dir = str(folder)
            else:
                recipe = f"calibration: {args.calib}\nsteps:\n" + "".join(f"  - {s}\n" for s in steps)
                lm = slimlm.compress(lm, recipe, out=folder).model
            build_s = time.perf_counter() - t0
            ppl = perplexity(lm.model, lm.tokenizer, text, window=512, add_bos=lm.info.add_bos,
                             max_tokens=args.max_tokens, progress=False)
            eff = efficiency(lm, new_tokens=args.new_tokens, repeats=3)
            if steps is None:
                dense_ppl, dense_bytes = ppl["perplexity"], eff["bytes_on_disk"]
            row = {"variant": label, "steps": steps, "perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
                   "ppl_ratio": ppl["perplexity"] / dense_ppl, "params": count_params(lm.model),
                   "bytes_on_disk": eff["bytes_on_disk"], "disk_ratio": eff["bytes_on_disk"] / dense_bytes,
                   "decode_tok_s": eff["decode_tok_s"], "prefill_tok_s": eff["prefill_tok_s"], "build_s": build_s,
                   "formats": sorted({type(m).__name__ for m in lm.model.modules() if hasattr(m, "format")})}
            if label == "wanda 50%":
                out["csr_vs_dense"] = csr_vs_dense_us(lm.model.model.layers[10].mlp.down_proj.weight.detach())
            out["rows"].append(row)
            print(f"{label}: ppl {row['perplexity']:.2f} ({row['ppl_ratio']:.3f}×), {row['bytes_on_disk'] / 1e6:.1f} MB, "
                  f"{row['decode_tok_s']:.1f} tok/s, {build_s:.0f} s", flush=True)
            (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1, default=str))
            shutil.rmtree(folder, ignore_errors=True)
            del lm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = table(out["rows"])
    (RESULTS / f"{args.name}.md").write_text(md + "\n")
    print(md)
    if "csr_vs_dense" in out:
        print("decode matmul, pruned down_proj:", out["csr_vs_dense"])


if __name__ == "__main__":
    main()
