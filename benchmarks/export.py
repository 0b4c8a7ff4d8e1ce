"""slimlm's calibrated 4-bit codes exported to GGUF vs llama.cpp's own quantizer, scored by llama.cpp's tools.

For one model (``--model default`` = SmolLM2-135M, or ``gemma3-270m``) this writes, into ``--work``:
- ``f16.gguf``: the fp model exported by slimlm (F16 matrices; the input of llama.cpp's quantizer);
- llama.cpp's own files from it with ``llama-quantize``: Q4_0, Q4_1, Q4_K_M, and Q4_0/Q4_1 with an
  importance matrix from ``llama-imatrix`` on the calibration text slimlm itself calibrates on (the very
  windows slimlm draws, decoded back to text);
- slimlm's files: GPTQ (and AWQ) at group 32 — symmetric → exact Q4_0 blocks, asymmetric → exact Q4_1 —
  with the token table as Q8_0 (what llama-quantize gives a tied table here) and, for size, as F16.
Every file is scored by ``llama-perplexity`` on WikiText-2 test (same ``--ctx`` and ``--chunks`` for all),
timed by ``llama-bench`` (pp512 / tg128, 2 threads), and its size recorded. The ONNX int4 export's decode
speed in onnxruntime is measured on SmolLM2 (llama family only).

Parts (each holds the CPU lock for its whole run; a table compares rows from one run of ``score``):
``--part compress`` writes the slimlm artifacts (GPTQ takes 2–3 min per config on 2 cores), ``--part score``
builds and scores every GGUF. Results merge into ``benchmarks/results/export.json`` under the model's name.

The llama.cpp tools are not slimlm dependencies; build them once from the llama-cpp-python sdist's vendored
source (~5 min on 2 cores) and pass the folder with ``--tools``::

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /work/tools/lc && cd /work/tools/lc
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-quantize llama-perplexity llama-bench llama-imatrix
    flock /tmp/slimlm-cpu.lock .venv/bin/python benchmarks/export.py --tools /work/tools/lc/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin --model default --part compress
    flock /tmp/slimlm-cpu.lock .venv/bin/python benchmarks/export.py --tools … --model default --part score
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import slimlm
from slimlm.config import CalibrationConfig
from slimlm.data import calibration_ids
from slimlm.models.load import wants_bos

RESULTS = Path(__file__).parent / "results" / "export.json"
# slimlm configs: name → (recipe step, GGUF type the codes land in exactly)
SLIMLM = {
    "gptq-g32-sym": ("gptq: {bits: 4, group_size: 32, symmetric: true}", "Q4_0"),
    "gptq-g32": ("gptq: {bits: 4, group_size: 32}", "Q4_1"),
    "awq-g32": ("awq: {bits: 4, group_size: 32}", "Q4_1"),
}
LLAMA_TYPES = ["Q4_0", "Q4_1", "Q4_K_M"]


def calibration(n_samples: int, seqlen: int) -> str:
    return f"calibration: {{source: wikitext2, n_samples: {n_samples}, seqlen: {seqlen}, seed: 0}}\n"


def run(cmd: list[str], **kw: Any) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def perplexity(tools: Path, gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    out = run([str(tools / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
               "-t", str(threads), "-b", str(ctx)])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def bench(tools: Path, gguf: Path, threads: int, reps: int) -> dict[str, float]:
    proc = subprocess.run([str(tools / "llama-bench"), "-m", str(gguf), "-p", "512", "-n", "128", "-t", str(threads), "-r", str(reps),
                           "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout)
    return {("pp512_tok_s" if r["n_prompt"] else "tg128_tok_s"): r["avg_ts"] for r in rows}


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return counts


def part_compress(args: argparse.Namespace, work: Path) -> None:
    """slimlm artifacts for every config in SLIMLM (kept in ``work`` for ``--part score``)."""
    for name in args.configs:
        out = work / f"slimlm-{name}"
        if out.exists():
            continue
        t = time.perf_counter()
        lm = slimlm.load(args.model)
        slimlm.compress(lm, calibration(args.n_samples, args.seqlen) + f"steps:\n  - {SLIMLM[name][0]}\n", out)
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)


def part_score(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tools = Path(args.tools)
    wiki = Path(args.data) / "wikitext-2-raw" / "wiki.test.raw"
    lm = slimlm.load(args.model)
    files: dict[str, dict[str, Any]] = {}
    f16 = work / "f16.gguf"
    slimlm.export(lm, f16, format="gguf", type="F16", overwrite=True)
    files["F16"] = {"by": "slimlm export (float)", "path": f16}
    # the calibration slimlm used, as text for llama-imatrix
    bos = lm.tokenizer.bos_token_id if wants_bos(lm.arch, lm.tokenizer) else None
    ids = calibration_ids(lm.tokenizer, CalibrationConfig(source="wikitext2", n_samples=args.n_samples, seqlen=args.seqlen), bos)
    calib = work / "calib.txt"
    calib.write_text("\n".join(lm.tokenizer.decode(r[1:] if bos is not None else r) for r in ids))
    imatrix = work / "imatrix.gguf"
    run([str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o", str(imatrix), "-c", str(args.seqlen),
         "--chunks", str(args.n_samples), "-t", str(args.threads)])
    for t in LLAMA_TYPES:
        p = work / f"llama-{t}.gguf"
        run([str(tools / "llama-quantize"), str(f16), str(p), t, str(args.threads)])
        files[f"llama.cpp {t}"] = {"by": "llama-quantize", "path": p}
    for t in ("Q4_0", "Q4_1"):
        p = work / f"llama-{t}-imatrix.gguf"
        run([str(tools / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(p), t, str(args.threads)])
        files[f"llama.cpp {t} + imatrix"] = {"by": "llama-quantize --imatrix", "path": p}
    del lm
    for name in args.configs:
        art = work / f"slimlm-{name}"
        if not art.exists():
            continue
        q = slimlm.load(art)
        for table in ("Q8_0", "F16"):
            p = work / f"slimlm-{name}-{table}.gguf"
            slimlm.export(q, p, format="gguf", type=table, overwrite=True)
            files[f"slimlm {name} → {SLIMLM[name][1]}, table {table}"] = {"by": "slimlm export", "path": p}
        del q
    rows = []
    for label, f in files.items():
        p = f["path"]
        row = {"file": label, "by": f["by"], "bytes": p.stat().st_size, "types": tensor_types(p),
               "perplexity": perplexity(tools, p, wiki, args.ctx, args.chunks, args.threads)}
        print(f"{label:<45} {row['bytes'] / 1e6:8.1f} MB  ppl {row['perplexity']:.4f}", flush=True)
        rows.append(row)
    speed_rows = ["llama.cpp Q4_0", "llama.cpp Q4_1"] + [r["file"] for r in rows if r["file"].startswith("slimlm") and "Q8_0" in r["file"]][:2]
    for r in rows:
        if r["file"] in speed_rows:
            r.update(bench(tools, files[r["file"]]["path"], args.threads, args.reps))
            print(f"{r['file']:<45} pp512 {r['pp512_tok_s']:.1f} tg128 {r['tg128_tok_s']:.1f}", flush=True)
    result: dict[str, Any] = {"model": args.model, "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
                              "calibration": {"source": "wikitext2 (v1 validation)", "n_samples": args.n_samples, "seqlen": args.seqlen},
                              "rows": rows}
    if args.onnx and args.model == "default" and (work / "slimlm-gptq-g32").exists():
        result["onnx"] = onnx_speed(work / "slimlm-gptq-g32", work / "onnx", args.threads)
    return result


def onnx_speed(artifact: Path, out: Path, threads: int, new_tokens: int = 64) -> dict[str, float]:
    """onnxruntime decode tok/s of the int4 (MatMulNBits) export, greedy, 64-token prompt."""
    import numpy as np

    from slimlm.export.onnx import onnx_session

    q = slimlm.load(artifact)
    slimlm.export(q, out, format="onnx", overwrite=True)
    sess = onnx_session(out, threads)
    ids = q.tokenizer("The history of the city begins in the early middle ages, when")["input_ids"]
    ids = (ids * 8)[:64]
    feeds = {"input_ids": np.array([ids], dtype=np.int64)}
    for inp in sess.get_inputs()[1:]:
        feeds[inp.name] = np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    res = dict(zip(names, sess.run(None, feeds)))
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(res["logits"][0, -1].argmax())
        feeds = {"input_ids": np.array([[tok]], dtype=np.int64)}
        feeds.update({n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")})
        res = dict(zip(names, sess.run(None, feeds)))
    decode = time.perf_counter() - t0
    return {"prefill_64_tok_s": 64 / prefill, "decode_tok_s": new_tokens / decode, "threads": threads}


def markdown(result: dict[str, Any]) -> str:
    """The docs table for one model's rows."""
    lines = ["| file | by | MB | perplexity | pp512 tok/s | tg128 tok/s |", "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        pp, tg = r.get("pp512_tok_s"), r.get("tg128_tok_s")
        lines.append(f"| {r['file']} | {r['by']} | {r['bytes'] / 1e6:.1f} | {r['perplexity']:.3f} | "
                     f"{'' if pp is None else f'{pp:.0f}'} | {'' if tg is None else f'{tg:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", required=True, help="folder with llama-quantize, llama-imatrix, llama-perplexity, llama-bench")
    ap.add_argument("--model", default="default")
    ap.add_argument("--part", choices=["compress", "score"], required=True)
    ap.add_argument("--configs", nargs="+", default=list(SLIMLM), choices=list(SLIMLM))
    ap.add_argument("--work", default="/tmp/slimlm-export-bench")
    ap.add_argument("--data", default="/work/shared/data")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work) / args.model
    work.mkdir(parents=True, exist_ok=True)
    if args.part == "compress":
        part_compress(args, work)
        return
    result = part_score(args, work)
    allres = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    allres[args.model] = {**result, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(allres, indent=1))
    print(markdown(result))
    print(f"results in {RESULTS}")


if __name__ == "__main__":
    main()
