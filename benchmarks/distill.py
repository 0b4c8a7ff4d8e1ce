"""Prune-then-distill benchmark on SmolLM2-135M (teacher) → the teacher with 50% of its blocks dropped.

For the untrained student, N steps of plain LM fine-tuning and N steps of each KD loss it reports
held-out perplexity, the share of the teacher–student perplexity gap recovered
``(ppl_student − ppl_after) / (ppl_student − ppl_teacher)``, tokens processed and wall time.
With ``--wanda`` it also compares LoRA with full fine-tuning after 50% Wanda pruning, both run as the
recipe ``wanda → distill`` (FKL from the dense model; pruned weights stay zero in both).

Short run (minutes):  .venv/bin/python benchmarks/distill.py --steps 8 --seq-len 128 --batch-size 2
Full run (issue target, ~30 min on 2 idle cores):
    .venv/bin/python benchmarks/distill.py --steps 300 --seq-len 256 --batch-size 4 --lr 3e-4 --wanda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import slimlm
from slimlm.data import load_text
from slimlm.distill import DistillConfig, train
from slimlm.eval import perplexity
from slimlm.eval.run import resolve_eval_source
from slimlm.methods.prune.layerdrop import drop_blocks

CALIB = "calibration: {n_samples: 4, seqlen: 128}\n"  # block influence / Wanda statistics


def ppl(lm: slimlm.LoadedModel, model: torch.nn.Module, text: str, tokens: int) -> float:
    return perplexity(model, lm.tokenizer, text, max_tokens=tokens, progress=False)["perplexity"]


def gap(p_student: float, p_after: float, p_teacher: float) -> float:
    return (p_student - p_after) / (p_student - p_teacher)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--losses", default="lm,fkl,rkl,skl,jsd", help="comma-separated; lm = plain fine-tuning")
    ap.add_argument("--eval", default="auto", help="auto (WikiText-2 test if present, else held-out Shakespeare)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--train-data", default="shakespeare")
    ap.add_argument("--wanda", action="store_true", help="also LoRA vs full fine-tuning after 50%% Wanda pruning")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/distill.json")
    args = ap.parse_args()

    source = resolve_eval_source(args.eval)
    text = load_text(source, "eval")
    teacher = slimlm.load("default")
    p_teacher = ppl(teacher, teacher.model, text, args.eval_tokens)
    probe = slimlm.compress(slimlm.load("default"), CALIB + "steps:\n  - layer_drop: {fraction: 0.5}\n")
    dropped = set(probe.reports[0].extra["dropped"])
    p_student = ppl(probe.model, probe.model.model, text, args.eval_tokens)
    del probe
    rows = [{"run": "teacher", "ppl": p_teacher}, {"run": "student (50% blocks dropped, untrained)", "ppl": p_student}]
    print(f"eval: {source}, first {args.eval_tokens} tokens, 512-token windows; teacher {p_teacher:.2f}, student {p_student:.2f}")
    for loss in filter(None, args.losses.split(",")):  # --losses "" with --wanda: only the Wanda rows
        student = slimlm.load("default")
        drop_blocks(student.model, student.arch, dropped)
        cfg = DistillConfig(loss=loss, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                            schedule="cosine", warmup_steps=max(1, args.steps // 10), progress=False)
        t0 = time.perf_counter()
        res = train(student.model, teacher.model if loss != "lm" else None, student.tokenizer, cfg, data=args.train_data)
        wall = time.perf_counter() - t0
        p = ppl(student, student.model, text, args.eval_tokens)
        rows.append({"run": f"{loss} × {args.steps} steps", "ppl": p, "gap_recovered": gap(p_student, p, p_teacher),
                     "tokens": res.tokens, "wall_s": wall, "first_loss": res.losses[0][1], "last_loss": res.losses[-1][1]})
        print(json.dumps(rows[-1]))
    if args.wanda:
        rows += wanda_rows(args, teacher, text, p_teacher)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "eval": source, "rows": rows}, indent=1))
    print("\n| run | ppl | gap recovered | tokens | wall s |\n|---|---|---|---|---|")
    for r in rows:
        g = f"{100 * r['gap_recovered']:.1f}%" if "gap_recovered" in r else "-"
        print(f"| {r['run']} | {r['ppl']:.2f} | {g} | {r.get('tokens', '-')} | {r.get('wall_s', 0):.0f} |")


def block_density(model: torch.nn.Module) -> float:
    """Share of the block linears' weights that are stored non-zero (compact sparse layers count their nnz)."""
    kept = total = 0
    for name, mod in model.named_modules():
        if ".layers." not in name:
            continue
        if hasattr(mod, "nnz"):
            kept, total = kept + mod.nnz, total + mod.in_features * mod.out_features
        elif type(mod) is torch.nn.Linear:
            kept, total = kept + int(mod.weight.count_nonzero()), total + mod.weight.numel()
    return kept / max(total, 1)


def wanda_rows(args: argparse.Namespace, teacher: slimlm.LoadedModel, text: str, p_teacher: float) -> list[dict]:
    """LoRA vs full fine-tuning after 50% Wanda, both as the recipe ``wanda → distill`` (FKL from the dense
    model, which the step loads as its teacher): the product path, sparsity held by the trainer."""
    pruned = slimlm.compress(slimlm.load("default"), CALIB + "steps:\n  - wanda: {sparsity: 0.5}\n").model
    p_pruned = ppl(pruned, pruned.model, text, args.eval_tokens)
    rows = [{"run": "50% Wanda, untrained", "ppl": p_pruned, "density": block_density(pruned.model)}]
    del pruned
    for kind in ("full", "lora"):
        distill = {"loss": "fkl", "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "lr": args.lr * (4 if kind == "lora" else 1), "schedule": "cosine",
                   "warmup_steps": max(1, args.steps // 10), "data": args.train_data,
                   **({"lora_r": args.lora_r} if kind == "lora" else {})}
        steps = [{"wanda": {"sparsity": 0.5}}, {"distill": distill}]
        res = slimlm.compress(slimlm.load("default"), CALIB + yaml.safe_dump({"steps": steps}))
        rep = res.reports[-1].extra
        p = ppl(res.model, res.model.model, text, args.eval_tokens)
        rows.append({"run": f"50% Wanda + {kind} FT (fkl KD) × {args.steps} steps", "ppl": p,
                     "gap_recovered": gap(p_pruned, p, p_teacher), "tokens": rep["tokens"], "wall_s": rep["train_seconds"],
                     "density": block_density(res.model.model)})
        print(json.dumps(rows[-1]))
    return rows


if __name__ == "__main__":
    main()
