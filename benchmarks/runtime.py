"""Decode speed of the engine per stored format, side by side with HF ``generate`` and llama.cpp, in one run.

Per model (SmolLM2-135M, Gemma-3-270M): 2 threads, a 128-token prompt, 128 new greedy tokens, median
of 5; prefill tok/s at a 512-token prompt (median of 3); batch-8 throughput for some rows; peak RSS.
Every row runs in its own subprocess (so peak RSS is that row's), sequentially, while this script
holds the shared CPU lock (``/tmp/slimlm-cpu.lock``) for its whole run.

Rows: ``hf-fp32-generate`` (``model.generate``), ``engine-fp32``, ``engine-bf16``, ``engine-int8``
(RTN 8-bit per channel), ``engine-int4-g32/g64/g128`` (RTN 4-bit: the kernels see the same packed
format GPTQ writes, so speed rows use RTN, which takes seconds instead of minutes), ``engine-int4-g64+emb8``
(plus the 8-bit g128 embedding table as tied head), ``llamacpp-Q8_0`` / ``llamacpp-Q4_0``
(llama-cpp-python on GGUFs converted from the same fp reference with llama.cpp's own
``convert_hf_to_gguf.py`` + quantizer; the sources are the llama-cpp-python 0.3.36 sdist, ``--llama-cpp``).

    python benchmarks/runtime.py --models default            # one model per run keeps each run < 8 min
    python benchmarks/runtime.py --models gemma3-270m
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "runtime.json"
RECIPES = {
    "int8": "steps: [{rtn: {bits: 8, group_size: -1}}]",
    "int4-g32": "steps: [{rtn: {bits: 4, group_size: 32}}]",
    "int4-g64": "steps: [{rtn: {bits: 4, group_size: 64}}]",
    "int4-g128": "steps: [{rtn: {bits: 4, group_size: 128}}]",
    "int4-g64+emb8": "steps: [{rtn: {bits: 4, group_size: 64}}, {embedding: {bits: 8, group_size: 128}}]",
}
ROWS = ["hf-fp32-generate", "engine-fp32", "engine-bf16", "engine-int8", "engine-int4-g32", "engine-int4-g64",
        "engine-int4-g128", "engine-int4-g64+emb8", "llamacpp-Q8_0", "llamacpp-Q4_0"]
BATCH_ROWS = {"engine-fp32", "engine-bf16", "engine-int8", "engine-int4-g64"}


@contextmanager
def cpu_lock(path: str = "/tmp/slimlm-cpu.lock") -> Iterator[None]:
    with open(path, "a") as f:
        print(f"waiting for {path} …", file=sys.stderr, flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_root() -> Path:
    from slimlm.models.load import cache_dir

    return Path(os.environ.get("SLIMLM_BENCH_CACHE", cache_dir() / "bench-runtime"))


def prompt(lm: Any, n: int) -> list[int]:
    from slimlm.data import load_text

    ids = lm.tokenizer(load_text("shakespeare", "eval")[:20000], add_special_tokens=False)["input_ids"]
    head = [lm.tokenizer.bos_token_id] if lm.info.add_bos else []
    return head + ids[: n - len(head)]


def prepare(model: str, llama_cpp: Path | None) -> dict[str, Path]:
    """Artifacts for the engine rows and GGUFs for llama.cpp (built once, cached)."""
    import slimlm
    from slimlm.recipe import Recipe

    root = cache_root() / model
    paths: dict[str, Path] = {}
    for name, recipe in RECIPES.items():
        out = root / name
        if not (out / "slimlm.json").is_file():
            slimlm.compress(model, Recipe.from_yaml(recipe), out, overwrite=True)
        paths[name] = out
    if llama_cpp is None:
        return paths
    import llama_cpp as lc

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from llamacpp_anchor import convert

    lm = slimlm.load(model)
    f32 = root / "model-f32.gguf"
    if not f32.is_file():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            convert(llama_cpp / "vendor" / "llama.cpp", lm.info.weights_dir, Path(tmp) / "m.gguf")
            os.replace(Path(tmp) / "m.gguf", f32)
    for qtype in ("Q8_0", "Q4_0"):
        out = root / f"model-{qtype}.gguf"
        if not out.is_file():
            params = lc.llama_model_quantize_default_params()
            params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{qtype}")
            params.nthread = 2
            tmp_out = out.with_suffix(".tmp")
            if lc.llama_model_quantize(str(f32).encode(), str(tmp_out).encode(), ctypes.byref(params)) != 0:
                raise SystemExit(f"llama.cpp could not quantize {f32} to {qtype}")
            os.replace(tmp_out, out)
        paths[f"llamacpp-{qtype}"] = out
    return paths


def _median_time(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_engine_row(row: str, model: str, art: str | None, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import slimlm
    from slimlm.runtime.decode import prefill
    from slimlm.runtime.engine import Engine
    from slimlm.runtime.kernels import describe
    from slimlm.runtime.sampling import GenConfig

    lm = slimlm.load(art or model)
    dtype = {"engine-fp32": torch.float32, "engine-bf16": torch.bfloat16}.get(row)
    eng = Engine(lm, dtype=dtype, max_seq=1024, compile=a.compile)
    ids, long_ids = prompt(lm, a.prompt_tokens), prompt(lm, a.prefill_tokens)
    cfg = GenConfig(max_new_tokens=a.new_tokens, stop_at_eos=False)
    eng.generate(ids, GenConfig(max_new_tokens=8, stop_at_eos=False))  # warm-up
    runs = [eng.generate(ids, cfg) for _ in range(a.repeats)]
    out = {"decode_tok_s": statistics.median(r.decode_tok_s for r in runs), "ttft_s": statistics.median(r.ttft_s for r in runs),
           "engine_dtype": str(eng.dtype).removeprefix("torch."), "kernel_paths": describe(eng.paths)}
    out["prefill_tok_s"] = len(long_ids) / _median_time(lambda: prefill(eng, [long_ids]), 3)
    if row in BATCH_ROWS:
        eng.generate([ids] * a.batch, GenConfig(max_new_tokens=4, stop_at_eos=False))
        secs = _median_time(lambda: eng.generate([ids] * a.batch, cfg), 1)
        out[f"batch{a.batch}_tok_s"] = a.batch * a.new_tokens / secs
    return out


def run_hf_row(model: str, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import slimlm

    lm = slimlm.load(model)
    ids = torch.tensor([prompt(lm, a.prompt_tokens)])
    long_ids = torch.tensor([prompt(lm, a.prefill_tokens)])
    gen = lambda n: lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    with torch.no_grad():
        gen(4)
        first = _median_time(lambda: gen(1), 3)
        total = _median_time(lambda: gen(a.new_tokens), a.repeats)
        pre = _median_time(lambda: lm.model(long_ids, use_cache=False, logits_to_keep=1), 3)
    return {"decode_tok_s": (a.new_tokens - 1) / (total - first), "ttft_s": first, "prefill_tok_s": long_ids.shape[1] / pre}


def run_llamacpp_row(model: str, gguf: str, a: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp

    import slimlm

    lm = slimlm.load(model)
    ids, long_ids = prompt(lm, a.prompt_tokens), prompt(lm, a.prefill_tokens)
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False)

    def decode() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        it = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        next(it)
        t1 = time.perf_counter()
        for _ in range(a.new_tokens - 1):
            next(it)
        return t1 - t0, time.perf_counter() - t1

    decode()
    runs = [decode() for _ in range(a.repeats)]

    def pre() -> None:
        llm.reset()
        llm.eval(long_ids)

    return {"decode_tok_s": (a.new_tokens - 1) / statistics.median(r[1] for r in runs),
            "ttft_s": statistics.median(r[0] for r in runs), "prefill_tok_s": len(long_ids) / _median_time(pre, 3)}


def child(a: argparse.Namespace) -> None:
    """One row in this process; prints its JSON as the last line."""
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.row == "hf-fp32-generate":
        out = run_hf_row(a.models, a)
    elif a.row.startswith("llamacpp-"):
        out = run_llamacpp_row(a.models, a.path, a)
    else:
        out = run_engine_row(a.row, a.models, a.path, a)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default", help="comma-separated: default,gemma3-270m")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's block step")
    p.add_argument("--llama-cpp", type=Path, default=Path("/work/tools/lc/llama_cpp_python-0.3.36"),
                   help="unpacked llama-cpp-python sdist (for convert_hf_to_gguf.py)")
    p.add_argument("--no-lock", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS, help="results JSON (runs of other models in it are kept)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.row:
        return child(a)
    rows = a.rows.split(",")
    results: dict[str, Any] = {}
    with (cpu_lock() if not a.no_lock else open(os.devnull)):
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for model in a.models.split(","):
            lcpp = a.llama_cpp if any(r.startswith("llamacpp") for r in rows) and a.llama_cpp.is_dir() else None
            try:
                paths = prepare(model, lcpp)
            except (Exception, SystemExit) as exc:  # llama.cpp missing or failing: the engine rows still run
                print(f"llama.cpp GGUFs unavailable ({exc}); engine rows only", file=sys.stderr)
                paths = prepare(model, None)
            table: dict[str, Any] = {}
            for row in rows:
                key = row.removeprefix("engine-")
                path = paths.get(row) or paths.get(key)
                if row.startswith("llamacpp") and path is None:
                    continue
                cmd = [sys.executable, __file__, "--row", row, "--models", model, "--threads", str(a.threads),
                       "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
                       "--prefill-tokens", str(a.prefill_tokens), "--repeats", str(a.repeats), "--batch", str(a.batch)]
                cmd += ["--path", str(path)] if path else []
                cmd += ["--compile"] if a.compile else []
                env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    table[row] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                else:
                    table[row] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(model, row, table[row], file=sys.stderr, flush=True)
            base = table.get("hf-fp32-generate", {}).get("decode_tok_s")
            for row, r in table.items():
                if base and "decode_tok_s" in r:
                    r["x_hf_generate"] = r["decode_tok_s"] / base
            results[model] = {"config": {k: getattr(a, k) for k in ("threads", "prompt_tokens", "new_tokens",
                                                                    "prefill_tokens", "repeats", "batch", "compile")},
                              "started": started, "rows": table}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    results = {**(json.loads(a.out.read_text()) if a.out.is_file() else {}), **results}  # other models' runs stay
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, a.out)
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    cols = ["decode_tok_s", "x_hf_generate", "ttft_s", "prefill_tok_s", "batch8_tok_s", "peak_rss_mib", "kernel_paths"]
    lines = []
    for model, res in results.items():
        lines += [f"\n**{model}** (started {res['started']})\n", "| row | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for row, r in res["rows"].items():
            cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, r.get("error", "")) if c != "kernel_paths" else r.get(c, "")) for c in cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
