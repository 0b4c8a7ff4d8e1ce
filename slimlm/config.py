"""Typed, strict configuration objects shared by the CLI, the Python API and YAML recipes.

Every step config is a pydantic model that forbids unknown keys, so a typo in a recipe is an
error rather than a silently ignored option.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

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
    n_samples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    propagate: Literal["compressed", "reference"] = Field(
        "compressed", description="what feeds each next block: the changed block's outputs (GPTQ's sequential "
        "mode) or the unchanged block's (one block forward less per block; no block errors reported)")
