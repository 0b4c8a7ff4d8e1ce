"""Speculative decoding on SmolLM2-135M: the target alone vs each draft kind, side by side in one run.

    .venv/bin/python benchmarks/speculative.py                     # fp32, 5 prompts × 2 tasks, 128 new tokens
    .venv/bin/python benchmarks/speculative.py --format int4       # the engine's fast path: RTN int4-g64, bf16 activations
    .venv/bin/python benchmarks/speculative.py --quick             # 2 prompts, 48 tokens (development)

Tasks, on WikiText-2 test paragraphs (greedy decoding, chat template for the instruction):
``grounded`` — "Summarize the following passage" + the passage (the output reuses the input's words),
``open`` — continue the first ~64 tokens of a paragraph (plain text, nothing to copy).
Drafts: ``lookup`` (prompt lookup, n ≤ 3), ``self:N`` (the target's first N blocks), and ``model``: the
target with 50% of its blocks dropped (ShortGPT) and briefly distilled back (skew KL), built once with
``slimlm distill`` into ``--draft-dir`` (default /work/cache/spec, or $SLIMLM_CACHE/spec) when absent.
For every prompt: wall time of the whole generation (prefill + decode, greedy, up to ``--new-tokens`` or
EOS) for the target alone and for each draft, speed-up = target time / draft time (``decode_speedup``:
the same without the identical prefill), acceptance = accepted / proposed draft tokens, and whether the
greedy text is identical to the target's. Medians over prompts. The script holds the shared CPU lock
(/tmp/slimlm-cpu.lock) for its whole run and uses 2 torch threads.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import slimlm
from slimlm.data import load_text
from slimlm.results import run_metadata
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig
from slimlm.runtime.speculative import ModelDraft, SpecConfig, make_draft, speculative_generate

DRAFT_RECIPE = """# recipes/drop50_distill.yaml's prune step (the distill step runs through `slimlm distill`)
calibration: {source: wikitext2, n_samples: 32, seqlen: 512}
steps:
  - layer_drop: {fraction: 0.5}
"""
DISTILL = ["--data", "wikitext2", "--loss", "skl", "--alpha", "0.1", "--batch-size", "4", "--seq-len", "256",
           "--lr", "3e-4", "--schedule", "wsd", "--warmup-steps", "3"]


def clean(text: str) -> str:
    """WikiText's tokenised spacing (``@-@``, `` , ``) back to ordinary prose."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([,.;:!?)'])", r"\1", text)
    return re.sub(r"\( ", "(", text).replace(" n't", "n't").strip()


def paragraphs(n: int, tokenizer, lo: int, hi: int) -> list[str]:
    """The first ``n`` WikiText-2 test paragraphs (no headings) of lo..hi tokens."""
    out = []
    for line in load_text("wikitext2", "eval").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        para = clean(line)
        if lo <= len(tokenizer(para)["input_ids"]) <= hi:
            out.append(para)
        if len(out) == n:
            break
    return out


def ensure_draft(folder: Path, steps: int) -> Path:
    """The distilled 50%-layer-drop draft artifact, built with ``slimlm distill`` if absent."""
    out = folder / f"draft-drop50-kd{steps}"
    if (out / "slimlm.json").is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "drop50.yaml"
    recipe.write_text(DRAFT_RECIPE)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "slimlm.cli", "distill", "--teacher", "default", "--student-recipe", str(recipe),
                    "--steps", str(steps), *DISTILL, "--out", str(out)], check=True)
    print(f"built draft {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


INT4 = "steps: [{rtn: {bits: 4, group_size: 64}}]\n"  # the engine's int4 kernel path (benchmarks/runtime.py's int4-g64)


def as_format(source: str, fmt: str, folder: Path) -> str:
    """``source`` itself (fp32 / bf16 run the same weights), or its RTN int4-g64 artifact, built once into ``folder``."""
    if fmt != "int4":
        return source
    out = folder / f"{Path(source).name}-int4-g64"
    if not (out / "slimlm.json").is_file():
        slimlm.compress(slimlm.load(source), INT4, out)
    return str(out)


def timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def summarize(rows: list[dict], names: list[str]) -> dict:
    """Medians over prompts, per task and draft."""
    summary = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        summary[task] = {"prompts": len(rs), "target_tok_s": statistics.median(r["target_tok_s"] for r in rs)}
        for name in names:
            ds = [r["drafts"][name] for r in rs]
            summary[task][name] = {"speedup": statistics.median(d["speedup"] for d in ds),
                                   "decode_speedup": statistics.median(d["decode_speedup"] for d in ds),
                                   "tok_s": statistics.median(d["tok_s"] for d in ds),
                                   "acceptance": statistics.median(d["acceptance"] for d in ds),
                                   "tokens_per_target_forward": statistics.median(r["new_tokens"] / d["target_forwards"]
                                                                                  for r, d in zip(rs, ds)),
                                   "identical": f"{sum(d['identical'] for d in ds)}/{len(ds)}"}
    return summary


def write(out: Path, result: dict) -> None:
    """Atomic write, after every prompt: a run cut short still leaves its rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)


def forward_ms(engine: Engine, ctx: int = 256, sizes: tuple[int, ...] = (1, 2, 5, 9), reps: int = 5) -> dict[str, float]:
    """Median ms of one target forward of T tokens after ``ctx`` cached tokens: what a verify block costs."""
    engine.reset(1)
    engine.forward(torch.zeros(1, ctx, dtype=torch.long))
    out = {}
    for t in sizes:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.forward(torch.zeros(1, t, dtype=torch.long))
            times.append(time.perf_counter() - t0)
            engine.truncate(ctx)
        out[str(t)] = 1000 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--format", choices=["fp32", "bf16", "int4"], default="fp32",
                    help="fp32 weights+activations; bf16 activations; int4: RTN 4-bit g64 target and draft (bf16 activations)")
    ap.add_argument("--self-blocks", type=int, default=10, help="N of the self:N draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--draft-dir", default=os.environ.get("SLIMLM_SPEC_DRAFTS", "/work/cache/spec"))
    ap.add_argument("--draft-steps", type=int, default=24, help="distillation steps of the model draft (4×256 tokens each)")
    ap.add_argument("--draft-model", default=None, help="use this draft model instead of building one")
    ap.add_argument("--drafts", default="lookup,self,model", help="comma-separated subset of lookup, self, model")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 48 new tokens")
    ap.add_argument("--no-lock", action="store_true", help="the caller already holds /tmp/slimlm-cpu.lock")
    ap.add_argument("--out", default="benchmarks/results/speculative.json")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.new_tokens = min(args.prompts, 2), min(args.new_tokens, 48)

    lock = open("/tmp/slimlm-cpu.lock", "w")
    if not args.no_lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the process exits: no one else perturbs the timings
    torch.set_num_threads(args.threads)
    kinds = set(args.drafts.split(","))
    if not kinds or not kinds <= {"lookup", "self", "model"}:
        ap.error(f"--drafts takes lookup, self and/or model, not {args.drafts!r}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int4": None}[args.format]  # None: the engine's choice (bf16)
    folder = Path(args.draft_dir)
    target = Engine(slimlm.load(as_format("default", args.format, folder)), max_seq=1024, dtype=dtype)
    drafts: dict = {}
    if "lookup" in kinds:
        drafts["lookup"] = make_draft("lookup", target)
    if "self" in kinds:
        drafts[f"self:{args.self_blocks}"] = make_draft(f"self:{args.self_blocks}", target)
    if "model" in kinds:
        draft_src = Path(args.draft_model) if args.draft_model else ensure_draft(folder, args.draft_steps)
        draft_src = Path(as_format(str(draft_src), args.format, folder))
        drafts["model"] = ModelDraft(Engine(slimlm.load(draft_src), max_seq=1024, dtype=dtype), name=str(draft_src))
    spec = SpecConfig(k=args.k, k_max=args.k_max)
    cfg = GenConfig(max_new_tokens=args.new_tokens)  # greedy; a summary may end at EOS before the budget
    tok = target.tokenizer
    tasks = {
        "grounded": [target.encode(f"Summarize the following passage.\n\n{p}", chat=True) for p in paragraphs(args.prompts, tok, 150, 400)],
        "open": [tok(p)["input_ids"][:64] for p in paragraphs(args.prompts, tok, 80, 400)],
    }
    target.generate(tasks["open"][0], GenConfig(max_new_tokens=8))  # warm-up
    model_draft = {}
    if "model" in drafts:
        info = drafts["model"].engine.lm.info
        model_draft = {"draft_model": drafts["model"].name, "draft_blocks": info.n_layers, "draft_params": info.n_params}
    result = {"config": {**vars(args), **model_draft, "target_kernels": sorted(set(target.paths)), "engine_dtype": str(target.dtype),
                         "target_params": target.lm.info.n_params, "spec": vars(spec)},
              "target_forward_ms": forward_ms(target), "meta": run_metadata()}
    rows: list[dict] = []
    for i in range(args.prompts):  # tasks interleaved: a run cut short still has both
        for task, prompts in tasks.items():
            ids = prompts[i]
            base, t_base = timed(lambda: target.generate(ids, cfg))
            row = {"task": task, "prompt": i, "prompt_tokens": len(ids), "new_tokens": len(base.tokens),
                   "target_s": t_base, "target_tok_s": len(base.tokens) / t_base, "target_decode_s": t_base - base.ttft_s, "drafts": {}}
            for name, draft in drafts.items():
                res, t = timed(lambda: speculative_generate(target, draft, ids, cfg, spec))
                row["drafts"][name] = {"s": t, "tok_s": len(res.tokens) / t, "speedup": t_base / t,
                                       "decode_speedup": (t_base - base.ttft_s) / (t - res.ttft_s), "acceptance": res.acceptance,
                                       "proposed": res.proposed, "accepted": res.accepted, "target_forwards": res.target_forwards,
                                       "identical": res.tokens == base.tokens}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "drafts"}),
                  {n: (round(d["speedup"], 2), round(d["acceptance"], 2), d["identical"]) for n, d in row["drafts"].items()}, flush=True)
            write(Path(args.out), {**result, "summary": summarize(rows, list(drafts)), "rows": rows})
    print(json.dumps(summarize(rows, list(drafts)), indent=1))


if __name__ == "__main__":
    main()
