"""Recipes: an ordered list of typed steps plus calibration settings, YAML in and YAML out.

YAML shape (every key is validated; unknown keys are errors)::

    calibration: {source: shakespeare, n_samples: 32, seqlen: 512, seed: 0}
    storage_dtype: float16        # unquantized tensors in the artifact
    steps:
      - rtn: {bits: 4, group_size: 128}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimlm.config import CalibrationConfig, StepConfig
from slimlm.errors import SlimlmError
from slimlm.methods import METHODS

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
TOP_KEYS = {"calibration", "storage_dtype", "steps"}


@dataclass
class Step:
    """One registered method and its validated config."""

    method: str
    config: StepConfig

    @classmethod
    def make(cls, method: str, options: dict[str, Any] | None = None, where: str | None = None) -> "Step":
        m = METHODS.get(method)
        return cls(method, m.config.parse(options, where or method))

    def to_dict(self) -> dict[str, Any]:
        return {self.method: self.config.model_dump()}


@dataclass
class Recipe:
    steps: list[Step]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    storage_dtype: str = "float16"

    def needs_calibration(self) -> bool:
        return any(METHODS.get(s.method).needs_calibration(s.config) for s in self.steps)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict):
            raise SlimlmError("recipe must be a mapping with a `steps:` list", "see recipes/rtn4.yaml for the shape")
        extra = set(data) - TOP_KEYS
        if extra:
            raise SlimlmError(f"recipe: unknown top-level key(s) {sorted(extra)}", f"allowed: {sorted(TOP_KEYS)}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise SlimlmError("recipe: `steps` must be a non-empty list", "e.g. steps: [{rtn: {bits: 4, group_size: 128}}]")
        steps = []
        for i, raw in enumerate(raw_steps):
            if isinstance(raw, str):
                raw = {raw: {}}
            if not isinstance(raw, dict) or len(raw) != 1:
                raise SlimlmError(f"recipe: step {i + 1} must be a one-key mapping such as {{rtn: {{bits: 4}}}}", "write each step as `- method: {options}`")
            (name, opts), = raw.items()
            if opts is not None and not isinstance(opts, dict):
                raise SlimlmError(f"recipe: options of step {i + 1} ({name}) must be a mapping", "write `- method: {key: value}`")
            steps.append(Step.make(str(name), opts, where=f"step {i + 1} ({name})"))
        storage = data.get("storage_dtype", "float16")
        if storage not in STORAGE_DTYPES:
            raise SlimlmError(f"recipe: storage_dtype {storage!r} is not supported", f"use one of {', '.join(STORAGE_DTYPES)}")
        return cls(steps, CalibrationConfig.parse(data.get("calibration"), "calibration"), storage)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise SlimlmError(f"recipe is not valid YAML{where}", "check indentation and brackets") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise SlimlmError(f"recipe file {p} not found", "pass the path of a YAML recipe")
        return cls.from_yaml(p.read_text())

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration.model_dump(),
            "storage_dtype": self.storage_dtype,
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
