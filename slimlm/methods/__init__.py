"""Compression methods, one module each, registered by name in :data:`METHODS`.

A method is a typed config plus ``run(ctx: StepContext, config) -> StepReport``; the numerics live in
pure functions over weights and statistics inside the same module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from slimlm.config import CalibrationConfig, StepConfig
from slimlm.models.arch import Arch, unmet
from slimlm.registry import Registry


@dataclass
class StepContext:
    """Everything a step may use: the model being compressed and how to get calibration data.

    ``source`` names the uncompressed model so that steps such as distillation can load a teacher.
    """

    model: nn.Module
    arch: Arch
    tokenizer: Any
    calibration: CalibrationConfig
    source: str
    bos_id: int | None = None
    _calib_ids: torch.Tensor | None = None

    def calib_ids(self) -> torch.Tensor:
        """Calibration token windows, drawn once and reused by every step of a recipe."""
        if self._calib_ids is None:
            from slimlm.data import calibration_ids, context_length

            self._calib_ids = calibration_ids(self.tokenizer, self.calibration, self.bos_id, context=context_length(self.model))
        return self._calib_ids


@dataclass
class StepReport:
    """What a step did: per-layer errors (relative), and anything else worth keeping."""

    method: str
    layer_errors: dict[str, float] = field(default_factory=dict)
    block_errors: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _always(cfg: Any) -> bool:
    return True


def _never(cfg: Any) -> bool:
    return False


def _nothing(cfg: Any) -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True)
class Method:
    """A registered step. ``needs``: architecture facts the step relies on for this config (names in
    :data:`slimlm.models.arch.NEEDS`), checked for every step before a recipe does any work.
    ``keeps_dense``: the step leaves trainable dense layers (pruning with zeros, structural removal),
    so training may follow it; packing steps (quantized, factored formats) do not. ``trains_dense``: the
    step trains full weights, so it must not follow a packing step (it would update norms and biases only)."""

    name: str
    config: type[StepConfig]
    run: Callable[..., StepReport]
    needs_calibration: Callable[[StepConfig], bool] = _always
    needs: Callable[[StepConfig], frozenset[str]] = _nothing
    keeps_dense: Callable[[StepConfig], bool] = _never
    trains_dense: Callable[[StepConfig], bool] = _never


METHODS: Registry[Method] = Registry("method", "slimlm.methods")


def register_method(name: str, config: type[StepConfig], *, needs_calibration: Callable[[Any], bool] | None = None,
                    needs: Callable[[Any], frozenset[str]] | None = None, keeps_dense: Callable[[Any], bool] | None = None,
                    trains_dense: Callable[[Any], bool] | None = None):
    """Decorator: register ``run`` under ``name`` with its config type and declared requirements."""

    def wrap(run: Callable[..., StepReport]) -> Callable[..., StepReport]:
        METHODS.register(name, Method(name, config, run, needs_calibration or _always, needs or _nothing,
                                      keeps_dense or _never, trains_dense or _never))
        return run

    return wrap


def refusal(method: str, cfg: StepConfig, model: nn.Module, arch: Arch) -> str | None:
    """Why ``method`` with ``cfg`` cannot run on ``model`` (one line), or None; no work is done."""
    for need in sorted(METHODS.get(method).needs(cfg)):
        reason = unmet(need, model.config, arch)
        if reason:
            return f"{method}: {reason}"
    return None
