"""Typed, strict configuration objects shared by the CLI, the Python API and YAML recipes.

Every step config is a pydantic model that forbids unknown keys, so a typo in a recipe is an
error rather than a silently ignored option.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimlm.errors import SlimlmError

C = TypeVar("C", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def parse(cls: type[C], data: dict[str, Any] | None, where: str) -> C:
        """Validate ``data``; turn pydantic's multi-line report into one SlimlmError line."""
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(root)"
            if first["type"] == "extra_forbidden":
                allowed = ", ".join(cls.model_fields)
                raise SlimlmError(f"{where}: unknown option {loc!r}", f"allowed options: {allowed}") from None
            raise SlimlmError(f"{where}: {loc}: {first['msg']}", "fix this value in the recipe or arguments") from None


class StepConfig(StrictConfig):
    """Base of every compression step's config."""


class CalibrationConfig(StrictConfig):
    """Where calibration text comes from and how much of it (never the evaluation split)."""

    source: str = "shakespeare"
    n_samples: int = Field(32, ge=1, le=100_000)
    seqlen: int = Field(512, ge=2, description="tokens per window (≤ the model's context, checked at calibration)")
    seed: int = Field(0, ge=0)
    batch_size: int = Field(4, ge=1)
    propagate: Literal["compressed", "reference"] = Field(
        "compressed", description="what feeds each next block: the changed block's outputs (GPTQ's sequential "
        "mode) or the unchanged block's (one block forward less per block; no block errors reported)")


def int_at_least(low: int, what: str = "a whole number") -> Callable[[str], int]:
    """An argparse ``type=`` for integers ≥ ``low``: a bad value is one usage line, not a traceback later."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {low}")
        return value

    parse.__name__ = f"int ≥ {low}"  # argparse names the type in its messages
    return parse
