"""``slimlm distill``: make or take a student, distil a teacher into it, save the artifact.

    slimlm distill --teacher default --student-recipe recipes/drop50.yaml --data shakespeare \
        --loss skl --steps 200 --out out/student
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError


def _packed_layer(model: Any, arch: Any) -> str | None:
    """Name of the first block linear that training cannot update (packed, compacted or factored), if any."""
    from torch import nn

    from slimlm.models.arch import block_linears, blocks

    for i, block in enumerate(blocks(model, arch)):
        for path, mod in block_linears(block, arch).items():
            if type(mod) is not nn.Linear:
                return f"{arch.blocks}.{i}.{path} ({type(mod).__name__})"
    return None


def cmd_distill(args: argparse.Namespace) -> None:
    from slimlm.compress import check_steps, dense_prefix, finalise, run_steps, step_context
    from slimlm.distill.trainer import DistillConfig, needs_teacher, train
    from slimlm.models.load import load
    from slimlm.recipe import Recipe

    if (args.student is None) == (args.student_recipe is None):
        raise SlimlmError("give exactly one of --student or --student-recipe", "e.g. --student-recipe recipes/drop50.yaml")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SlimlmError(f"output folder {out} already exists", "choose another --out or pass --overwrite")
    opts = {k: v for k, v in {
        "loss": args.loss, "mode": args.mode, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "seq_len": args.seq_len, "lr": args.lr, "temperature": args.temperature, "alpha": args.alpha, "beta": args.beta,
        "lm_weight": args.lm_weight, "schedule": args.schedule, "warmup_steps": args.warmup_steps, "save_every": args.save_every,
        "lora_r": args.lora_r, "topk": args.topk, "grad_checkpointing": args.grad_checkpointing or None, "seed": args.seed,
    }.items() if v is not None}
    cfg = DistillConfig.parse(opts, "distill")
    recipe = Recipe.load(args.student_recipe) if args.student_recipe else None
    student = load(args.teacher) if recipe else load(args.student)
    after: list = []
    reports: list = []
    if recipe is not None:
        # train the student dense: the recipe's leading structural/pruning steps run first, the steps that
        # pack layers (quantization, factoring) run on the trained weights afterwards
        check_steps(student, recipe.steps)
        ctx = step_context(student, recipe)
        split = dense_prefix(recipe.steps)
        reports = run_steps(ctx, recipe.steps[:split])
        after = recipe.steps[split:]
        if after:
            print(f"distill: training after {[s.method for s in recipe.steps[:split]]}; "
                  f"{[s.method for s in after]} run on the trained student")
    elif not cfg.lora_r and (packed := _packed_layer(student.model, student.arch)):
        raise SlimlmError(f"--student holds packed layers training cannot update, e.g. {packed}",
                          "distil the dense model with --student-recipe (it is compressed after training), or pass --lora-r")
    teacher = load(args.teacher) if needs_teacher(cfg) else None
    bos = student.tokenizer.bos_token_id if student.info.add_bos else None
    ckpt = Path(args.checkpoints) if args.checkpoints else out.with_name(out.name + ".ckpt")
    res = train(student.model, teacher.model if teacher else None, student.tokenizer, cfg, data=args.data, out=ckpt,
                arch=student.arch, bos_id=bos, teacher_tokenizer=teacher.tokenizer if teacher else None)
    model = res.model
    if cfg.lora_r:
        from slimlm.distill.lora import merge_lora, save_adapters
        from slimlm.methods.quant.rtn import requantize_like

        save_adapters(model, out.with_name(out.name + ".lora"))
        model = merge_lora(model, requantize=requantize_like)
    if after:
        reports += run_steps(ctx, after)
    storage = recipe.storage_dtype if recipe else args.storage_dtype
    recipe_yaml = (recipe.to_yaml() if recipe else student.info.recipe or "") + f"# distilled from {args.teacher}: {cfg.model_dump_json()}\n"
    report = {"distill": {"losses": res.losses, "tokens": res.tokens, "seconds": res.seconds},
              "steps": [asdict(r) for r in reports]}
    finalise(student._replace(model=model), recipe_yaml=recipe_yaml, storage_dtype=storage, out=out, report=report,
             overwrite=args.overwrite)
    first, last = (res.losses[0][1], res.losses[-1][1]) if res.losses else (float("nan"), float("nan"))
    print(f"distill {cfg.loss}: steps {res.start_step}→{cfg.steps}, loss {first:.4f} → {last:.4f}, "
          f"{res.tokens} tokens in {res.seconds:.1f}s; artifact written to {out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("distill", help="distil a teacher into a student (KD, on-policy, sequence-level, LoRA)")
    d.add_argument("--teacher", required=True, help="teacher model (`default`, a folder, a .gguf, an artifact)")
    d.add_argument("--student", help="student model with the teacher's tokenizer")
    d.add_argument("--student-recipe", help="YAML recipe that turns the teacher into the student (e.g. layer_drop); "
                   "structural and pruning steps run before training, packing steps (quantization, low rank) after it")
    d.add_argument("--data", default="shakespeare", help="text source (calibration split) or, with --mode sequence, a prompt/completion JSONL")
    d.add_argument("--out", required=True, help="artifact folder for the trained student")
    d.add_argument("--checkpoints", help="checkpoint folder (default OUT.ckpt); an unfinished run there is resumed")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--storage-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="with --student (a --student-recipe brings its own storage_dtype)")
    d.add_argument("--loss", help="fkl | rkl | skl | srkl | jsd | tvd | lm (default fkl)")
    d.add_argument("--mode", choices=["off_policy", "on_policy", "sequence"])
    for name, typ in (("steps", int), ("batch-size", int), ("grad-accum", int), ("seq-len", int), ("lr", float),
                      ("temperature", float), ("alpha", float), ("beta", float), ("lm-weight", float), ("warmup-steps", int),
                      ("save-every", int), ("lora-r", int), ("topk", int), ("seed", int)):
        d.add_argument(f"--{name}", type=typ)
    d.add_argument("--schedule", choices=["cosine", "wsd", "constant"])
    d.add_argument("--grad-checkpointing", action="store_true")
    d.set_defaults(func=cmd_distill)
