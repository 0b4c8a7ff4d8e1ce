"""The outside anchor for benchmarks/quant.py: llama.cpp's own quantizer on the same fp reference,
scored through llama-cpp-python on exactly the tokens slimlm scores.

The fp reference that slimlm loads (its cached fp32 Hugging Face folder) is converted to a GGUF F32
file with llama.cpp's ``convert_hf_to_gguf.py``, quantized with ``llama-quantize`` to each ``--types``
entry, and every file is run through ``llama_cpp.Llama`` with all logits kept. The token windows come
from :func:`slimlm.data.eval_windows` with the same tokenizer, window, BOS rule and token cap as
``benchmarks/quant.py``, so the perplexities of both tables are over identical tokens (llama.cpp's
own ``llama-perplexity`` scores only the second half of each window; it is not used here).

llama.cpp is not a slimlm dependency: build it once from the sources vendored in the
llama-cpp-python sdist (~5 min on 2 cores) and point this script at it::

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/lc && cd /tmp/lc
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF && cmake --build build -j2 --target llama-quantize
    cd path/to/slimlm && .venv/bin/pip install diskcache   # llama-cpp-python's one dependency slimlm lacks
    .venv/bin/python benchmarks/llamacpp_anchor.py --llama-cpp /tmp/lc/llama_cpp_python-0.3.36

``--llama-cpp`` is the unpacked sdist: its Python package is imported from there and its ctypes
bindings load the ``libllama`` just built (``LLAMA_CPP_LIB_PATH``), so llama-cpp-python need not be
compiled a second time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def find_lib_dir(build: Path) -> Path:
    """Folder holding the freshly built ``libllama.so`` (its location moved between llama.cpp versions)."""
    for cand in sorted(build.rglob("libllama.*")):
        return cand.parent
    raise SystemExit(f"no libllama in {build}: build llama.cpp first (see this script's docstring)")


def convert(llama_cpp_src: Path, hf_dir: str, out: Path) -> None:
    """F32 GGUF of a Hugging Face folder; a stale ``quantization_config`` (left by a GGUF-sourced load) is dropped."""
    plain = out.parent / "hf"
    plain.mkdir()
    for f in Path(hf_dir).iterdir():
        if f.name != "config.json":
            (plain / f.name).symlink_to(f)
    cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (plain / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_src / "gguf-py")}
    cmd = [sys.executable, str(llama_cpp_src / "convert_hf_to_gguf.py"), str(plain), "--outtype", "f32", "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-2000:]}")


def quantize(build: Path, src: Path, dst: Path, qtype: str, threads: int) -> float:
    tool = next(build.rglob("llama-quantize"), None)
    if tool is None:
        raise SystemExit(f"no llama-quantize under {build}: build the target llama-quantize")
    t = time.perf_counter()
    proc = subprocess.run([str(tool), str(src), str(dst), qtype, str(threads)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-quantize {qtype} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t


def llama_perplexity(path: Path, windows: list[list[int]], threads: int) -> dict[str, Any]:
    """exp(mean NLL) of every predicted token of ``windows``, each window evaluated from an empty cache."""
    import llama_cpp

    n_ctx = max(len(w) for w in windows)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    nll, count = 0.0, 0
    t = time.perf_counter()
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # (T-1, vocab): predictions of w[1:]
        mx = logits.max(axis=1, keepdims=True)
        logz = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1)))
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "eval_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="unpacked llama-cpp-python sdist whose vendor/llama.cpp is built")
    ap.add_argument("--model", default="default", help="slimlm model spec (default, gemma3-270m, a folder)")
    ap.add_argument("--types", default="F32,Q8_0,Q4_K_M,Q4_0")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/llamacpp_anchor.json")
    args = ap.parse_args()

    src = args.llama_cpp / "vendor" / "llama.cpp"  # convert_hf_to_gguf.py and llama-quantize live here
    build = src / "build"
    os.environ["LLAMA_CPP_LIB_PATH"] = str(find_lib_dir(build))
    sys.path.insert(0, str(args.llama_cpp))  # llama-cpp-python's own Python package, bound to that libllama

    import slimlm
    from slimlm.data import encode, eval_windows, load_text
    from slimlm.results import run_metadata

    lm = slimlm.load(args.model)
    if not lm.info.weights_dir:
        raise SystemExit(f"{args.model}: no fp weights folder to convert")
    bos = lm.tokenizer.bos_token_id if lm.info.add_bos else None
    windows = [w.tolist() for w in eval_windows(encode(lm.tokenizer, load_text("wikitext2", "eval")), args.window, bos,
                                                 args.max_tokens)]
    hf_dir = lm.info.weights_dir
    del lm
    rows = []
    out = Path(args.json)
    with tempfile.TemporaryDirectory(prefix="slimlm-llamacpp-") as tmp:
        f32 = Path(tmp) / "model-F32.gguf"
        convert(src, hf_dir, f32)
        for qtype in args.types.split(","):
            path = f32 if qtype == "F32" else Path(tmp) / f"model-{qtype}.gguf"
            secs = None if qtype == "F32" else quantize(build, f32, path, qtype, args.threads)
            row = {"type": qtype, "bytes_on_disk": path.stat().st_size, "quant_s": secs,
                   **llama_perplexity(path, windows, args.threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": {**run_metadata(), "model": args.model, "window": args.window,
                                                "max_tokens": args.max_tokens, "data": "wikitext2 test"},
                                       "rows": rows}, indent=1, default=str))
    f = rows[0]["perplexity"] if rows and rows[0]["type"] == "F32" else None
    print("\n| llama.cpp type | ppl | ratio vs F32 | disk MB |\n|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['perplexity'] / f:.4f}" if f else "-"
        print(f"| {r['type']} | {r['perplexity']:.3f} | {ratio} | {r['bytes_on_disk'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
