"""Shared adapter for methods that transform block linears one at a time.

The method supplies a pure ``transform(name, linear, stats) -> module`` and the statistic kinds it
needs; this module selects targets by regex, drives calibration when statistics are needed, swaps
modules in place and measures each layer's relative output error.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import torch
from torch import nn

from slimlm.calibrate import BlockContext, LinearStats, run_sequential
from slimlm.config import StepConfig
from slimlm.errors import SlimlmError
from slimlm.memory import drop_file_pages
from slimlm.methods import StepReport
from slimlm.models.arch import Arch, block_linears, blocks, input_groups, set_module

Transform = Callable[[str, nn.Linear, LinearStats | None], nn.Module]


class LinearStepConfig(StepConfig):
    """Which block linears a step touches: ``targets``/``exclude`` are regexes on full module names."""

    targets: str = ".*"
    exclude: str | None = None


def _with_parts(linears: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Expand composite layers (e.g. low-rank ``LowRankLinear``) into their inner linears."""
    out: dict[str, nn.Module] = {}
    for local, mod in linears.items():
        parts = getattr(mod, "linear_parts", None)
        out.update({f"{local}.{k}": m for k, m in parts().items()} if callable(parts) else {local: mod})
    return out


def select_linears(model: nn.Module, arch: Arch, cfg: LinearStepConfig, where: str) -> dict[str, nn.Linear]:
    """Plain ``nn.Linear`` modules of every block that match the config (already-converted layers are skipped)."""
    try:
        inc = re.compile(cfg.targets)
        exc = re.compile(cfg.exclude) if cfg.exclude else None
    except re.error as err:
        raise SlimlmError(f"{where}: invalid regex in targets/exclude ({err})", "fix the regular expression") from None
    chosen: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks(model, arch)):
        for local, mod in _with_parts(block_linears(block, arch)).items():
            name = f"{arch.blocks}.{i}.{local}"
            if type(mod) is nn.Linear and inc.search(name) and not (exc and exc.search(name)):
                chosen[name] = mod
    if not chosen:
        raise SlimlmError(
            f"{where}: targets {cfg.targets!r} (exclude {cfg.exclude!r}) match no unconverted linear layer",
            "check the regex against module names such as model.layers.0.mlp.down_proj",
        )
    return chosen


def require_finite_weights(targets: dict[str, nn.Module], where: str) -> None:
    """NaN/inf in a weight would silently poison every grid fitted from it.

    Called per layer (or block) when its turn comes, not for the whole model up front: reading every
    weight first would page the whole memory-mapped checkpoint into RSS at once (+~420 MiB peak on
    SmolLM2), while layer by layer each fp32 page leaves again as soon as its layer is packed.
    """
    for name, mod in targets.items():
        if not torch.isfinite(mod.weight).all():
            raise SlimlmError(f"{where}: weight of {name} contains NaN or inf",
                              "repair or reload the model; a compressed model cannot be built from non-finite weights")


def layer_error(w: torch.Tensor, w_new: torch.Tensor, stats: LinearStats | None) -> float:
    """Relative output error of a weight change, weighted by input statistics when known."""
    d = (w_new.float() - w.float())
    w = w.float()
    if stats is not None and stats.hessian is not None:
        h = stats.hessian
        return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp(min=1e-30))
    if stats is not None and stats.sq is not None:
        return float((d.pow(2) * stats.sq).sum() / (w.pow(2) * stats.sq).sum().clamp(min=1e-30))
    return float(d.pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))


def apply_to_linears(
    model: nn.Module,
    arch: Arch,
    targets: dict[str, nn.Linear],
    transform: Transform,
    *,
    method: str,
    kinds: frozenset[str] = frozenset(),
    calib_ids: torch.Tensor | None = None,
    batch_size: int = 4,
    propagate: str = "compressed",
) -> StepReport:
    """Replace each target by ``transform``'s result, calibrating block by block if ``kinds``.

    Consumes ``targets``: each entry is removed once its layer is replaced, so the original weights
    are freed as the pass goes instead of living until the end (peak memory stays near one model).
    """
    report = StepReport(method=method)
    t0 = time.perf_counter()

    def swap(name: str, mod: nn.Linear, stats: LinearStats | None, root: nn.Module, path: str) -> None:
        w = mod.weight.detach().clone()
        new = transform(name, mod, stats)
        if new is not mod:
            set_module(root, path, new)
            drop_file_pages(mod.weight, model)  # the replaced fp weight leaves RSS now, not at exit
        report.layer_errors[name] = layer_error(w, new.weight.detach(), stats)

    if not kinds:
        for name in list(targets):
            swap(name, targets.pop(name), None, model, name)
    else:
        if calib_ids is None:
            raise ValueError(f"{method} needs calibration data")

        def process(ctx: BlockContext) -> None:
            prefix = ctx.name + "."
            local = {n.removeprefix(prefix): targets.pop(n) for n in [n for n in targets if n.startswith(prefix)]}
            if not local:
                return
            stats = ctx.collect(local, kinds, input_groups(arch))
            for path, mod in local.items():
                swap(prefix + path, mod, stats[path], ctx.block, path)

        report.block_errors = run_sequential(model, arch, calib_ids, process, batch_size=batch_size,
                                             propagate=propagate, desc=method)
    report.seconds = time.perf_counter() - t0
    return report
