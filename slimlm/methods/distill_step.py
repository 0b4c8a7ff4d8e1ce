"""Recipe step ``distill``: train the model being compressed against the model the recipe started from.

The teacher is ``ctx.source`` (loaded afresh, unchanged) unless ``teacher`` names another model, so
``layer_drop → distill → gptq`` is one YAML (the Minitron recipe: Muralidharan et al. 2024,
"Compact Language Models via Pruning and Knowledge Distillation"). With ``lora_r`` the adapters
are merged back into the weights before the next step.
"""

from __future__ import annotations

import time

from pydantic import Field

from slimlm.config import StepConfig
from slimlm.distill.trainer import DistillConfig, needs_teacher, train
from slimlm.methods import StepContext, StepReport, register_method


class DistillStepConfig(DistillConfig, StepConfig):
    """:class:`DistillConfig` plus where the text, the teacher and the checkpoints come from."""

    data: str = Field("shakespeare", description="training text source (its calibration split) or JSONL for mode sequence")
    teacher: str | None = Field(None, description="teacher model; default: the model the recipe started from")
    checkpoint_dir: str | None = Field(None, description="folder for checkpoints; an existing run there is resumed")
    progress: bool = False


@register_method("distill", DistillStepConfig, needs_calibration=lambda cfg: False, keeps_dense=lambda cfg: True,
                 trains_dense=lambda cfg: not cfg.lora_r)  # LoRA adapters also train on packed layers (QLoRA)
def run_distill(ctx: StepContext, cfg: DistillStepConfig) -> StepReport:
    from slimlm.models.load import load

    t0 = time.perf_counter()
    train_cfg = DistillConfig(**cfg.model_dump(exclude={"data", "teacher", "checkpoint_dir"}))
    teacher = load(cfg.teacher or ctx.source) if needs_teacher(train_cfg) else None
    result = train(ctx.model, teacher.model if teacher else None, ctx.tokenizer, train_cfg, data=cfg.data,
                   out=cfg.checkpoint_dir, arch=ctx.arch, bos_id=ctx.bos_id,
                   teacher_tokenizer=teacher.tokenizer if teacher else None)
    if cfg.lora_r:
        from slimlm.distill.lora import merge_lora
        from slimlm.methods.quant.rtn import requantize_like

        merge_lora(result.model, requantize=requantize_like)  # folds adapters into ctx.model's own modules
    losses = [loss for _, loss in result.losses]
    return StepReport(method="distill", seconds=time.perf_counter() - t0,
                      extra={"teacher": cfg.teacher or ctx.source, "steps": cfg.steps, "start_step": result.start_step,
                             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                             "tokens": result.tokens, "train_seconds": result.seconds})
