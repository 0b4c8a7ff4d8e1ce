"""Sampling continuations of a model that is being trained (on-policy distillation) through the engine."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from slimlm.models.arch import arch_for
from slimlm.runtime.decode import prefill
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig, sample


@torch.no_grad()
def continue_ids(model: nn.Module, ids: torch.Tensor, new_tokens: int, cfg: GenConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, P + new_tokens): each row of ``ids`` continued by sampling, EOS ignored.

    For a model being trained (on-policy distillation): a fresh engine per call reads the live
    weights (LoRA wrappers run their own forward), in the model's own dtype.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = SimpleNamespace(model=base, tokenizer=None, arch=arch_for(base.config.model_type),
                         info=SimpleNamespace(add_bos=False, source="student"))
    dtype = next(p.dtype for p in base.parameters() if p.is_floating_point())
    engine = Engine(lm, max_batch=len(ids), max_seq=ids.shape[1] + new_tokens, dtype=dtype, notice=False)
    logits = prefill(engine, ids.tolist())
    out = [ids.cpu()]
    for step in range(new_tokens):
        nxt = sample(logits, cfg, generator)
        out.append(nxt[:, None].cpu())
        if step < new_tokens - 1:
            logits = engine.forward(nxt[:, None])[:, -1]
    return torch.cat(out, 1).to(ids.device)
