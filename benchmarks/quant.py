"""Quantization side by side: fp reference, RTN, GPTQ, AWQ (4-bit and 3-bit, g128) and every other
registered quantizer, on SmolLM2-135M and/or Gemma-3-270M (``--models``).

Each quantization runs in its own subprocess so its wall time, CPU time and peak RSS (``ru_maxrss``,
model load included) are measured honestly; the same subprocess then scores WikiText-2 test
perplexity (first ``--max-tokens`` tokens, ``--window``-token non-overlapping windows, BOS per window
where the model wants it) on the quantized model, which is bit-identical to its saved artifact.

    python benchmarks/quant.py                       # SmolLM2, writes benchmarks/results/quant.json
    python benchmarks/quant.py --models default,gemma3-270m --max-tokens 8192
    python benchmarks/quant.py --only rtn4,gptq4     # a subset of rows
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OTHER_QUANT = ("smoothquant", "nf4", "ternary")  # colleagues' methods: included when registered


Row = dict[str, Any]  # {"steps": [{method: options}, ...], "calibration": {overrides}}; None = fp reference


def configs(bits_list: list[int], group_size: int, symmetric: bool, others: list[str]) -> dict[str, Row | None]:
    """Row name → recipe steps (method, options) and calibration overrides; ``None`` is the fp reference."""
    rows: dict[str, Row | None] = {"fp": None}
    for bits in bits_list:
        opts = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
        for method in ("rtn", "gptq", "awq"):
            rows[f"{method}{bits}"] = {"steps": [{method: dict(opts)}]}
        # ablations: columns in natural order; blocks fed the fp model's outputs (one block forward less)
        rows[f"gptq{bits}-noact"] = {"steps": [{"gptq": {**opts, "act_order": False}}]}
        rows[f"gptq{bits}-ref"] = {"steps": [{"gptq": dict(opts)}], "calibration": {"propagate": "reference"}}
        rows[f"gptq{bits}-clip"] = {"steps": [{"gptq": {**opts, "clip": True}}]}  # clipped static grids
        # AWQ's scales folded into the float model, then GPTQ rounds the rescaled weights
        rows[f"awq+gptq{bits}"] = {"steps": [{"awq": {**opts, "quantize": False}}, {"gptq": dict(opts)}]}
        # the same, with the embedding table (tied head) in 8-bit codes instead of fp16
        rows[f"gptq{bits}+emb8"] = {"steps": [{"gptq": dict(opts)}, {"embedding": {"bits": 8, "group_size": group_size}}]}
    for name in others:
        rows[name] = {"steps": [{name: {}}]}
    return rows


def quant_bits_per_weight(model: Any) -> float | None:
    """Stored bits per weight of the converted linears, scales and zero points included (biases excluded)."""
    import torch

    from slimlm.layers import FORMATS

    known = set(FORMATS.names())
    bits, weights = 0, 0
    for mod in model.modules():
        if getattr(mod, "format", None) not in known:
            continue
        bias = getattr(mod, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) else None
        tensors = {id(t): t for t in list(mod.parameters()) + list(mod.buffers()) if bias is None or t is not bias}
        bits += sum(t.numel() * t.element_size() * 8 for t in tensors.values())
        weights += mod.logical_numel() - (bias.numel() if bias is not None else 0)
    return bits / weights if weights else None


def worker(args: argparse.Namespace) -> None:
    """One row: load, quantize (timed), save, then score perplexity; prints one JSON line."""
    import torch

    import slimlm
    from slimlm.data import load_text
    from slimlm.eval import perplexity
    from slimlm.eval.efficiency import bytes_on_disk

    spec = json.loads(args.step)
    t0, c0 = time.perf_counter(), time.process_time()
    lm = slimlm.load(args.model)
    distinct = {id(p): p for p in lm.model.parameters()}.values()  # tied embeddings counted once
    row: dict[str, Any] = {"name": args.name, "step": spec and spec["steps"],
                           "calibration": spec and spec.get("calibration"),
                           "fp32_bytes": 4 * sum(p.numel() for p in distinct if p.dtype.is_floating_point)}
    if spec is not None:
        recipe = {"calibration": {"source": args.calib, "n_samples": args.n_samples, "seqlen": args.seqlen,
                                  **spec.get("calibration", {})},
                  "steps": spec["steps"]}
        import yaml

        res = slimlm.compress(lm, yaml.safe_dump(recipe), Path(args.out) / args.name)
        lm = res.model
        row.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                   step_seconds=sum(r.seconds for r in res.reports),
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   bytes_on_disk=bytes_on_disk(str(res.out)), bits_per_weight=quant_bits_per_weight(lm.model))
    else:
        row.update(bytes_on_disk=bytes_on_disk(lm.info.weights_dir),
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, bits_per_weight=32.0)
    with torch.no_grad():
        ppl = perplexity(lm.model, lm.tokenizer, load_text("wikitext2", "eval"), window=args.window,
                         add_bos=lm.info.add_bos, max_tokens=args.max_tokens, progress=False)
    row.update(perplexity=ppl["perplexity"], tokens=ppl["tokens"], windows=ppl["windows"], bos=ppl["bos"])
    print("ROW " + json.dumps(row), flush=True)


def run_row(name: str, spec: Row | None, model: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--name", name, "--step", json.dumps(spec), "--model", model,
           "--out", str(out), "--calib", args.calib, "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen),
           "--window", str(args.window), "--max-tokens", str(args.max_tokens)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(f"  {name}: failed ({tail[0]})", flush=True)
        return {"name": name, "step": spec and spec["steps"], "error": tail[0]}
    row = json.loads(rows[-1])
    print(f"  {name}: ppl {row['perplexity']:.3f} ({time.perf_counter() - t:.0f}s incl. eval)", flush=True)
    return row


def table(model: str, rows: list[dict[str, Any]]) -> str:
    fp = next((r for r in rows if r["name"] == "fp" and "perplexity" in r), None)
    lines = [f"### {model}", "",
             "| row | ppl | ppl ratio | bits/weight | disk MB | disk ratio vs fp32 | quant wall s | quant CPU s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:60]} | | | | | | | |")
            continue
        ratio = r["perplexity"] / fp["perplexity"] if fp else float("nan")
        disk = r.get("bytes_on_disk") or 0
        fmt = (lambda k, f: f.format(r[k]) if r.get(k) is not None else "-")
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {ratio:.4f} | {fmt('bits_per_weight', '{:.3f}')} | "
                     f"{disk / 1e6:.1f} | {disk / r['fp32_bytes']:.3f} | {fmt('seconds', '{:.0f}')} | "
                     f"{fmt('cpu_seconds', '{:.0f}')} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each stated as met or missed with the measured figure."""
    by = {r["name"]: r for r in rows if "perplexity" in r}
    out = []

    def ppl(n: str) -> float:
        return by[n]["perplexity"]

    for m in ("gptq4", "awq4"):
        if m in by and "rtn4" in by:
            out.append(f"{m} ppl {ppl(m):.3f} < rtn4 {ppl('rtn4'):.3f}: {'met' if ppl(m) < ppl('rtn4') else 'MISSED'}")
    if "gptq4" in by and "fp" in by:
        r = ppl("gptq4") / ppl("fp")
        out.append(f"gptq4 ppl ratio {r:.4f} ≤ 1.04: {'met' if r <= 1.04 else 'MISSED'}")
        g = by["gptq4"]
        out.append(f"gptq4 wall {g['seconds']:.0f} s (CPU {g['cpu_seconds']:.0f} s) < 120 s: "
                   f"{'met' if g['seconds'] < 120 else 'MISSED'}")
        if "gptq4-ref" in by:
            f = by["gptq4-ref"]
            out.append(f"gptq4-ref (reference propagation) wall {f['seconds']:.0f} s < 120 s: "
                       f"{'met' if f['seconds'] < 120 else 'MISSED'} (ppl ratio {ppl('gptq4-ref') / ppl('fp'):.4f})")
        rss, fp32 = g["peak_rss_bytes"], g["fp32_bytes"]
        out.append(f"gptq4 peak RSS {rss / 2**20:.0f} MiB < 2× fp32 model {2 * fp32 / 2**20:.0f} MiB: "
                   f"{'met' if rss < 2 * fp32 else 'MISSED'}")
        for name in ("gptq4", "gptq4+emb8"):
            if name in by:
                disk = by[name]["bytes_on_disk"] / fp32
                out.append(f"{name} artifact {disk:.3f}× fp32 bytes ≤ 0.16×: {'met' if disk <= 0.16 else 'MISSED'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="default", help="comma-separated: default (SmolLM2-135M), gemma3-270m (needs its packages)")
    p.add_argument("--methods", default=None, help=f"other registered quantizers to add (default: those of {OTHER_QUANT} registered)")
    p.add_argument("--only", default=None, help="comma-separated row names to run (fp is always run)")
    p.add_argument("--bits", default="4,3", help="bit widths for rtn/gptq/awq")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true", help="symmetric grids (default asymmetric)")
    p.add_argument("--calib", default="shakespeare", help="calibration text")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--json", default="benchmarks/results/quant.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--model", default="default", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from slimlm.methods import METHODS
    from slimlm.results import run_metadata

    registered = set(METHODS.names())
    others = [m for m in (args.methods.split(",") if args.methods else OTHER_QUANT) if m and m in registered]
    rows_cfg = configs([int(b) for b in args.bits.split(",")], args.group_size, args.symmetric, others)
    if args.only:
        keep = {"fp", *args.only.split(",")}
        rows_cfg = {k: v for k, v in rows_cfg.items() if k in keep}
    models = args.models.split(",")
    result: dict[str, Any] = {"meta": {**run_metadata(), "data": "wikitext2 test", "window": args.window,
                                       "max_tokens": args.max_tokens, "group_size": args.group_size,
                                       "symmetric": args.symmetric,
                                       "calibration": {"source": args.calib, "n_samples": args.n_samples,
                                                       "seqlen": args.seqlen}},
                              "models": {}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = []
    with tempfile.TemporaryDirectory(prefix="slimlm-quant-bench-") as tmp:
        for model in models:
            print(f"{model}: {', '.join(rows_cfg)}", flush=True)
            rows: list[dict[str, Any]] = []
            for name, spec in rows_cfg.items():
                rows.append(run_row(name, spec, model, args, Path(tmp) / model))
                result["models"][model] = {"rows": rows, "targets": targets(rows)}
                out.write_text(json.dumps(result, indent=1, default=str))  # partial results survive an interrupt
            report += [table(model, rows), "", *[f"- {t}" for t in targets(rows)], ""]
    tokens = next((r.get("tokens") for m in result["models"].values() for r in m["rows"] if r.get("tokens")), None)
    report.append(f"WikiText-2 test, first {args.max_tokens} tokens ({tokens} scored), {args.window}-token windows; "
                  f"g{args.group_size} {'symmetric' if args.symmetric else 'asymmetric'}; calibration "
                  f"{args.n_samples}×{args.seqlen} tokens of {args.calib}; {os.cpu_count()} CPUs.")
    print("\n".join(report))
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
