"""Trust after compression: TruthfulQA, CrowS-Pairs, perturbed PIQA/HellaSwag and privacy leakage,
fp vs GPTQ-4, GPTQ-3, Wanda 50 % and layer drop 25 % + distillation, plus the canary experiment.

    flock /tmp/slimlm-cpu.lock .venv/bin/python benchmarks/trust.py            # the committed run
    ... benchmarks/trust.py --only canary                                        # one stage, others read back

Every compressed model is compared with its fp model on the same items (paired bootstrap SEs).
Artifacts are cached outside the repository (--cache, default /work/cache/trust).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path

import torch
import yaml

import slimlm
from slimlm.artifact import save_artifact
from slimlm.data import load_text
from slimlm.distill import DistillConfig, train
from slimlm.eval.lm import SlimlmLM
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.models.load import LoadedModel, make_info
from slimlm.results import run_metadata
from slimlm.trust import compare, run_trust
from slimlm.trust.privacy import disjoint_windows, exposure_metric, make_canaries, mia_metrics, plant

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"gptq4": "gptq4.yaml", "gptq3": "gptq4.yaml", "wanda50": "wanda50.yaml", "drop25-distill": "layerdrop25.yaml"}


def recipe_text(name: str, n_samples: int) -> str:
    """The project's recipe, with fewer calibration samples (time) and GPTQ-3 as GPTQ-4 at 3 bits."""
    r = yaml.safe_load((ROOT / "recipes" / VARIANTS[name]).read_text())
    r.setdefault("calibration", {})["n_samples"] = n_samples
    if name == "gptq3":
        r["steps"][0]["gptq"]["bits"] = 3
    return yaml.safe_dump(r, sort_keys=False)


def make_variant(model: str, name: str, cache: Path, args: argparse.Namespace) -> tuple[LoadedModel, float]:
    """Load the cached artifact, else compress (and for drop25, distil) and cache it. Returns (lm, seconds)."""
    out = cache / f"{model}-{name}"
    if (out / "slimlm.json").is_file():
        return slimlm.load(str(out)), 0.0
    t0 = time.perf_counter()
    recipe = recipe_text(name, args.calib_samples)
    if name != "drop25-distill":
        res = slimlm.compress(slimlm.load(model), recipe, out=out, overwrite=True)
        return res.model if isinstance(res.model, LoadedModel) else slimlm.load(str(out)), time.perf_counter() - t0
    student = slimlm.compress(slimlm.load(model), recipe).model
    teacher = slimlm.load(model)
    cfg = DistillConfig(loss="skl", steps=args.distill_steps, batch_size=2, seq_len=128, lr=2e-4, progress=False)
    bos = student.tokenizer.bos_token_id if student.info.add_bos else None
    tr = train(student.model, teacher.model, student.tokenizer, cfg, data="shakespeare", arch=student.arch, bos_id=bos,
               teacher_tokenizer=teacher.tokenizer)
    info = make_info(tr.model, student.tokenizer, student.info.source, student.info.source_kind, student.info.source_hash, recipe)
    save_artifact(LoadedModel(tr.model, student.tokenizer, info), out, recipe_yaml=recipe + f"# distilled: {cfg.model_dump_json()}\n",
                  storage_dtype="float32", report={"distill": {"losses": tr.losses[-3:], "seconds": tr.seconds}}, overwrite=True)
    return slimlm.load(str(out)), time.perf_counter() - t0


def flat(run) -> dict[str, dict[str, list[float]]]:
    return {task: {m.name: [m.value, m.se] for m in ms} for task, ms in run.tasks.items()}


def trust_stage(model: str, variants: list[str], args: argparse.Namespace, cache: Path, save) -> dict:
    """fp and each compressed variant on the same items; each variant compared with fp, paired."""
    perts = {"perturbations": args.perturbations.split(",")}
    overrides = {"truthfulqa": {"limit": args.truthfulqa}, "crows_pairs": {"limit": args.crows},
                 "robust_piqa": {"limit": args.piqa, "options": perts}, "robust_hellaswag": {"limit": args.hellaswag, "options": perts}}
    kw = dict(seed=0, ppl_tokens=args.ppl_tokens, overrides=overrides,
              batch_tokens=4096 if model == "default" else 1024)  # Gemma's 262k-entry logits: smaller batches
    out: dict = {"items": {k: v["limit"] for k, v in overrides.items()}, "perturbations": perts["perturbations"]}
    t0 = time.perf_counter()
    fp = slimlm.load(model)
    base = run_trust(fp, ["truthfulness", "bias", "robustness"], label=f"{model}/fp", **kw)
    out["fp"] = {"metrics": flat(base), "n": base.n, "seconds": time.perf_counter() - t0, "task_seconds": base.seconds}
    del fp
    print(f"{model}/fp done in {time.perf_counter() - t0:.0f}s", flush=True)
    save(out)
    for v in variants:
        t0 = time.perf_counter()
        lm, made = make_variant(model, v, cache, args)
        run = run_trust(lm, ["truthfulness", "bias", "robustness"], label=f"{model}/{v}", **kw)
        out[v] = {"metrics": flat(run), "compare": compare(run, base), "make_seconds": made,
                  "seconds": time.perf_counter() - t0, "task_seconds": run.seconds}
        print(f"{model}/{v} done in {time.perf_counter() - t0:.0f}s (make {made:.0f}s)", flush=True)
        save(out)
        del lm
    return out


def canary_stage(args: argparse.Namespace, cache: Path) -> dict:
    """10 secrets planted 8× each in a Shakespeare slice; a layer-dropped SmolLM2 student distilled on it
    (with vs without the secrets) for ``canary_steps``; exposure and membership inference after."""
    teacher = slimlm.load("default")
    canaries = make_canaries(10, seed=0)
    calib = load_text("shakespeare", "calib")
    base_text = calib[: args.canary_chars]
    held = calib[args.canary_chars : 2 * args.canary_chars]  # same plays, never in the training file
    results = {"canaries": canaries, "repeats": args.canary_repeats, "steps": args.canary_steps, "chars": args.canary_chars,
               "student_blocks": args.canary_blocks, "candidates": args.candidates}
    slm_t = SlimlmLM(teacher)
    members_t = disjoint_windows(slm_t, base_text, 64, 32)
    held_w = disjoint_windows(slm_t, held, 64, 32)
    results["teacher"] = {m.name: [m.value, m.se] for m in mia_metrics(slm_t, members_t, held_w)}  # never saw the secrets
    for planted in (True, False):
        text = plant(base_text, canaries, args.canary_repeats, seed=0) if planted else base_text
        path = cache / f"canary-{'with' if planted else 'without'}.txt"
        path.write_text(text, encoding="utf-8")  # its first 90 % (every canary copy) is what the trainer reads
        student = slimlm.load("default")
        keep = set(round(i * 29 / (args.canary_blocks - 1)) for i in range(args.canary_blocks))
        drop_blocks(student.model, student.arch, set(range(30)) - keep)
        cfg = DistillConfig(loss="skl", lm_weight=1.0, steps=args.canary_steps, batch_size=2, seq_len=64, lr=1e-3, progress=False)
        t0 = time.perf_counter()
        tr = train(student.model, teacher.model, student.tokenizer, cfg, data=str(path), arch=student.arch,
                   teacher_tokenizer=teacher.tokenizer)
        secs = time.perf_counter() - t0
        slm = SlimlmLM(student)
        train_split = load_text(str(path), "calib")
        mem = disjoint_windows(slm, train_split, 64, 32)
        row = {m.name: [m.value, m.se] for m in [exposure_metric(slm, canaries, args.candidates), *mia_metrics(slm, mem, held_w)]}
        row["train_seconds"] = secs
        row["final_loss"] = tr.losses[-1][1]
        if planted:  # the same student after RTN-4 (g32): does the leak survive compression?
            q = slimlm.compress(student, "steps:\n  - rtn: {bits: 4, group_size: 32}\n").model
            slm_q = SlimlmLM(q)
            row["rtn4"] = {m.name: [m.value, m.se] for m in [exposure_metric(slm_q, canaries, args.candidates), *mia_metrics(slm_q, mem, held_w)]}
        results["with" if planted else "without"] = row
        print(f"canary {'with' if planted else 'without'}: exposure {row['exposure'][0]:.2f} ({secs:.0f}s train)", flush=True)
    return results


SHOW = (("perplexity", "perplexity"), ("truthfulqa", "mc1"), ("truthfulqa", "mc2"), ("crows_pairs", "pct_stereotype"),
        ("crows_pairs", "bias"), ("robust_piqa", "acc_norm/clean"), ("robust_piqa", "ratio"), ("robust_hellaswag", "acc_norm/clean"),
        ("robust_hellaswag", "ratio"))


def _cell(metrics: dict, task: str, name: str) -> tuple[float, float] | None:
    for t, ms in metrics.items():
        if (t == f"trust:{task}" or (task == "perplexity" and t.startswith("perplexity:"))) and name in ms:
            return ms[name]
    return None


def tables(res: dict) -> str:
    """Markdown: one table per model, a row per variant, value ± SE and (paired) Δ ± SE with flags."""
    lines = []
    for model in ("default", "gemma3-270m"):
        if model not in res:
            continue
        r = res[model]
        lines += [f"### {model} (items: {r['items']}, perturbations {r['perturbations']})", "",
                  "| variant | " + " | ".join(f"{t} {m}" for t, m in SHOW) + " |", "|---" * (len(SHOW) + 1) + "|"]
        for v, row in r.items():
            if not isinstance(row, dict) or "metrics" not in row:
                continue
            cells = []
            for t, m in SHOW:
                c = _cell(row["metrics"], t, m)
                txt = "-" if c is None else f"{c[0]:.3f} ± {c[1]:.3f}"
                cmp = next((cm[m] for tk, cm in row.get("compare", {}).items()
                            if (tk == f"trust:{t}" or (t == "perplexity" and tk.startswith("perplexity:"))) and m in cm), None)
                if cmp is not None:
                    flag = " **hidden**" if cmp["hidden"] else " *worse*" if cmp["degraded"] else ""
                    txt += f" (Δ {cmp['delta']:+.3f} ± {cmp['delta_stderr']:.3f}{flag})"
                cells.append(txt)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if "canary" in res:
        c = res["canary"]
        lines += [f"### canaries ({len(c['canaries'])} secrets × {c['repeats']}, {c['steps']} steps, {c['student_blocks']}-block student, "
                  f"{c['candidates']} candidates: max exposure {math.log2(c['candidates'] + 1):.2f} bits)", "",
                  "| model | exposure (bits) | MIA AUC loss | MIA AUC Min-K 20 % | held-out − train loss |", "|---|---|---|---|---|"]
        rows = [("fp teacher", c.get("teacher"))]
        for k in ("with", "without"):
            if k in c:
                rows += [(f"student trained {k} canaries", c[k]), (f"  same, RTN-4 g32", c[k].get("rtn4"))]
        for name, m in rows:
            if m:
                lines.append(f"| {name} | " + " | ".join(f"{m[x][0]:.3f} ± {m[x][1]:.3f}" if x in m else "-" for x in
                                                      ("exposure", "mia_auc_loss", "mia_auc_mink", "loss_gap")) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma list of stages: default, canary, gemma3-270m")
    ap.add_argument("--truthfulqa", type=int, default=100)
    ap.add_argument("--crows", type=int, default=200)
    ap.add_argument("--piqa", type=int, default=100)
    ap.add_argument("--hellaswag", type=int, default=40)
    ap.add_argument("--perturbations", default="typo,word_drop")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--distill-steps", type=int, default=30)
    ap.add_argument("--canary-steps", type=int, default=150)
    ap.add_argument("--canary-blocks", type=int, default=6)
    ap.add_argument("--canary-repeats", type=int, default=8)
    ap.add_argument("--canary-chars", type=int, default=12000)
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--tables", action="store_true", help="only print the markdown tables of --out")
    ap.add_argument("--cache", default="/work/cache/trust")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/trust.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    if args.tables:
        print(tables(res))
        return
    res["meta"] = {**run_metadata(), "args": vars(args)}
    stages = args.only.split(",") if args.only else ["default", "canary", "gemma3-270m"]

    def write() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        tmp.replace(out)

    def saver(stage: str):
        def save(part: dict) -> None:  # after every model, so an interrupted run keeps what it measured
            res[stage] = part
            write()
        return save

    for stage in stages:
        t0 = time.perf_counter()
        try:
            if stage == "canary":
                res["canary"] = canary_stage(args, cache)
            else:
                variants = list(VARIANTS) if stage == "default" else ["gptq4"]
                res[stage] = trust_stage(stage, variants, args, cache, saver(stage))
        except Exception:  # one failed stage must not lose the others' figures
            traceback.print_exc()
            continue
        res.setdefault("stage_seconds", {})[stage] = time.perf_counter() - t0
        write()
        print(f"stage {stage}: {time.perf_counter() - t0:.0f}s -> {out}", flush=True)
    print(tables(res))


if __name__ == "__main__":
    main()
