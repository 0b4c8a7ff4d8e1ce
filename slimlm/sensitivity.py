"""Per-layer sensitivity to weight quantization: which linears can take fewer bits.

Each unit (one linear, or every linear of one block) is quantized *alone* at the given bit width,
and the change of the model's final next-token distribution on a few calibration windows is
measured — KL(fp ‖ quantized) per token, or the NLL increase. Hidden states at every block boundary
of the unquantized model are computed once, so a unit in block ``i`` only re-runs blocks ``i…L-1``.
The scores feed mixed-precision recipes (``targets`` regexes per bit width) and the automatic search.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimlm.calibrate import capture_block_inputs, collect_linear_stats
from slimlm.config import CalibrationConfig
from slimlm.data import calibration_ids
from slimlm.errors import SlimlmError
from slimlm.methods.linear import LinearStepConfig, require_finite_weights, select_linears
from slimlm.methods.quant.gptq import gptq_quantize
from slimlm.methods.quant.grid import round_to_nearest
from slimlm.methods.quant.rtn import check_group_sizes, resolve_group_size
from slimlm.models.arch import blocks, final_softcap, get_module
from slimlm.models.load import LoadedModel

METRICS = ("kl", "nll")
UNITS = ("layer", "block")


def _rtn(w: torch.Tensor, h: torch.Tensor | None, bits: int, g: int, sym: bool) -> torch.Tensor:
    return round_to_nearest(w, bits, g, sym).dequantize(w.dtype)


def _gptq(w: torch.Tensor, h: torch.Tensor | None, bits: int, g: int, sym: bool) -> torch.Tensor:
    assert h is not None
    return gptq_quantize(w, h, bits=bits, group_size=g, symmetric=sym).dequantize(w.dtype)


# name → (needs the layer's input Hessian, fake-quantizer returning the dequantized weight)
QUANTIZERS: dict[str, tuple[bool, Callable[..., torch.Tensor]]] = {"rtn": (False, _rtn), "gptq": (True, _gptq)}


def _log_probs(model: nn.Module, lm: LoadedModel, hidden: list[torch.Tensor]) -> torch.Tensor:
    """(n, T, vocab) log-probabilities from the last block's outputs."""
    norm = get_module(model, lm.arch.final_norm)
    head = get_module(model, lm.arch.lm_head)
    cap = final_softcap(model.config, lm.arch)
    logits = head(norm(torch.cat(hidden))).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1)


def _score(logp: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor, metric: str) -> float:
    if metric == "kl":  # mean over tokens of Σ p_fp (log p_fp - log p_q)
        return float((ref.exp() * (ref - logp)).sum(-1).mean())
    tgt = ids[:, 1:].to(logp.device)
    nll = -logp[:, :-1].gather(-1, tgt[..., None]).mean()
    nll_ref = -ref[:, :-1].gather(-1, tgt[..., None]).mean()
    return float(nll - nll_ref)


@torch.no_grad()
def layer_sensitivity(lm: LoadedModel, *, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                      method: str = "rtn", metric: str = "kl", unit: str = "layer", source: str = "shakespeare",
                      n_windows: int = 4, seqlen: int = 128, targets: str = ".*", exclude: str | None = None,
                      progress: bool = True) -> dict[str, float]:
    """Output-error score of quantizing each linear (or block) alone: ``{name: score}``, larger = more sensitive."""
    if method not in QUANTIZERS:
        raise SlimlmError(f"sensitivity: unknown method {method!r}", f"use one of {', '.join(QUANTIZERS)}")
    if metric not in METRICS or unit not in UNITS:
        raise SlimlmError(f"sensitivity: metric {metric!r} / unit {unit!r} not supported",
                          f"metric: {', '.join(METRICS)}; unit: {', '.join(UNITS)}")
    if not 2 <= bits <= 8:
        raise SlimlmError(f"sensitivity: {bits} bits is not supported", "use 2–8 bits")
    model, arch = lm.model, lm.arch
    chosen = select_linears(model, arch, LinearStepConfig(targets=targets, exclude=exclude), "sensitivity")
    check_group_sizes(chosen, group_size, "sensitivity")
    require_finite_weights(chosen, "sensitivity")
    needs_h, quantize = QUANTIZERS[method]
    bos = lm.tokenizer.bos_token_id if lm.info.add_bos else None
    ids = calibration_ids(lm.tokenizer, CalibrationConfig(source=source, n_samples=n_windows, seqlen=seqlen), bos)

    layers = blocks(model, arch)
    cap = capture_block_inputs(model, arch, ids, batch_size=len(ids))
    hidden = [cap.inputs]  # hidden[i]: inputs of block i (one tensor per batch)
    for i, block in enumerate(layers):
        hidden.append([block(x, **kw) for x, kw in zip(hidden[i], cap.kwargs[i])])
    ref = _log_probs(model, lm, hidden[-1])

    units: dict[str, list[str]] = {}
    for name in chosen:
        units.setdefault(name if unit == "layer" else _block_of(name, arch.blocks), []).append(name)

    hessians: dict[str, torch.Tensor] = {}
    scores: dict[str, float] = {}
    for key, names in tqdm(units.items(), desc="sensitivity", unit=unit, disable=not progress):
        here = _block_of(names[0], arch.blocks)
        i = int(here.rsplit(".", 1)[1])
        if needs_h and names[0] not in hessians:
            mods = {n: chosen[n] for n in chosen if _block_of(n, arch.blocks) == here}
            stats, _ = collect_linear_stats(mods, {"hessian"}, lambda: [layers[i](x, **kw) for x, kw in zip(hidden[i], cap.kwargs[i])])
            hessians.update({n: s.hessian for n, s in stats.items()})
        saved = {}
        for n in names:
            lin = chosen[n]
            g = resolve_group_size(group_size, lin.in_features, n, "sensitivity")
            saved[n] = lin.weight.data
            lin.weight.data = quantize(lin.weight.data, hessians.get(n), bits, g, symmetric)
        try:
            h = hidden[i]
            for j in range(i, len(layers)):
                h = [layers[j](x, **kw) for x, kw in zip(h, cap.kwargs[j])]
            scores[key] = _score(_log_probs(model, lm, h), ref, ids, metric)
        finally:
            for n, w in saved.items():
                chosen[n].weight.data = w
    return dict(sorted(scores.items(), key=lambda kv: -kv[1]))


def _block_of(name: str, blocks_path: str) -> str:
    """``model.layers.3.mlp.up_proj`` → ``model.layers.3``."""
    index = name[len(blocks_path) + 1 :].split(".")[0]
    return f"{blocks_path}.{index}"


def format_table(scores: dict[str, float], meta: dict[str, Any], top: int | None = None) -> str:
    """Ranked markdown table with each unit's share of the summed score."""
    total = sum(max(v, 0.0) for v in scores.values()) or 1.0
    lines = [f"sensitivity at {meta['bits']}-bit g{meta['group_size']} ({meta['method']}, {meta['metric']}, "
             f"{meta['n_windows']}×{meta['seqlen']} tokens of {meta['source']})", "",
             "| rank | layer | score | share |", "|---:|---|---:|---:|"]
    for rank, (name, v) in enumerate(list(scores.items())[: top or None], start=1):
        lines.append(f"| {rank} | {name} | {v:.5f} | {100 * max(v, 0.0) / total:.1f}% |")
    return "\n".join(lines)

