"""Round-to-nearest quantization of the token embedding table (and the output head).

Block linears are most of a large model but not of a small one: SmolLM2-135M's table is a fifth of
its weights and half of a 4-bit artifact when left in fp16. This step stores the table as packed
codes (8-bit by default: llama.cpp keeps ``token_embd`` at 6–8 bits for the same reason, since the
head's logits are sensitive). A tied head reads the same codes; an untied head is quantized the same
way as its own layer when ``head`` is set.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field
from torch import nn

from slimlm.config import StepConfig
from slimlm.errors import SlimlmError
from slimlm.layers.embedding import QuantEmbedding, TiedQuantHead
from slimlm.layers.quant import QuantLinear, pack_bits
from slimlm.memory import drop_file_pages, page_out
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.quant.grid import round_to_nearest
from slimlm.methods.quant.rtn import resolve_group_size
from slimlm.models.arch import embed_scale, set_module


class EmbeddingQuantConfig(StepConfig):
    bits: int = Field(8, ge=2, le=8, description="bits per table entry (rows must fill whole bytes)")
    group_size: int = Field(128, description="entries per scale along the hidden dimension; -1 = one per row")
    symmetric: bool = False
    head: bool = Field(True, description="also quantize an untied lm_head (a tied one always shares the codes)")


ROWS = 16_384  # table rows rounded at a time: Gemma's 262k × 640 fp32 table is 671 MB, each temporary as large


def fill_rows(layer: QuantLinear, weight: torch.Tensor, symmetric: bool) -> float:
    """Write RTN codes of ``weight`` (out, in) into ``layer``'s packed buffers, ``ROWS`` rows at a time.

    Rows fill whole bytes, so each slice's codes land at their own byte range of ``qweight``: no list of
    parts, no concatenation and no full-size code tensor ever exists. Returns the relative error.
    """
    out, dim = weight.shape
    row_bytes = dim * layer.bits // 8
    err, ref = 0.0, 0.0
    for start in range(0, out, ROWS):
        stop = min(start + ROWS, out)
        rows = weight[start:stop].detach().float()
        part = round_to_nearest(rows, layer.bits, layer.group_size, symmetric)
        err += float((part.dequantize() - rows).pow(2).sum())
        ref += float(rows.pow(2).sum())
        page_out(weight[start:stop].detach())  # read once: its mapped fp pages need not stay (671 MB on Gemma)
        layer.qweight[start * row_bytes : stop * row_bytes] = pack_bits(part.q, layer.bits)
        layer.scales[start:stop] = part.scale
        layer.zeros[start:stop] = part.zero
    return err / max(ref, 1e-30)


def quantize_table(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, embed_scale: float | None
                   ) -> tuple[QuantEmbedding, float]:
    """A :class:`QuantEmbedding` holding RTN codes of ``weight`` (vocab, dim), and its relative error."""
    vocab, dim = weight.shape
    table = QuantEmbedding(dim, vocab, bits, group_size, embed_scale=embed_scale).to(weight.device)
    return table, fill_rows(table, weight, symmetric)


@register_method("embedding", EmbeddingQuantConfig, needs_calibration=lambda cfg: False)
def run_embedding(ctx: StepContext, cfg: EmbeddingQuantConfig) -> StepReport:
    t0 = time.perf_counter()
    model, arch = ctx.model, ctx.arch
    emb = model.get_submodule(arch.embed)
    if not isinstance(emb, nn.Embedding):
        raise SlimlmError(f"embedding: {arch.embed} is already converted ({type(emb).__name__})",
                          "quantize the embedding once per recipe")
    dim = emb.embedding_dim
    if (dim * cfg.bits) % 8:
        raise SlimlmError(f"embedding: {cfg.bits}-bit rows of {dim} entries do not fill whole bytes",
                          "use 4 or 8 bits")
    g = resolve_group_size(cfg.group_size, dim, arch.embed, "embedding")
    head = model.get_submodule(arch.lm_head)
    tied = head.weight is emb.weight
    table, error = quantize_table(emb.weight, cfg.bits, g, cfg.symmetric, embed_scale(model.config, arch))
    set_module(model, arch.embed, table)
    report = StepReport(method="embedding")
    report.layer_errors[arch.embed] = error
    if tied:
        set_module(model, arch.lm_head, TiedQuantHead.tie(model, arch.embed))
        drop_file_pages(emb.weight, model)
    elif cfg.head and isinstance(head, nn.Linear):
        qh = QuantLinear(dim, head.out_features, cfg.bits, g, head.bias is not None).to(head.weight.device)
        report.layer_errors[arch.lm_head] = fill_rows(qh, head.weight, cfg.symmetric)  # untied: as large as the table
        if head.bias is not None:
            qh.bias = nn.Parameter(head.bias.detach().clone())
        set_module(model, arch.lm_head, qh)
        drop_file_pages(head.weight, model)
    report.extra["tied"] = tied
    report.seconds = time.perf_counter() - t0
    return report
