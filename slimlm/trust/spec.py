"""Trust suites as data: a YAML per suite item (shipped ones in ``defs/``, or the user's own).

A trust task wraps an ordinary slimlm task (``slimlm/eval/tasks``: its reader, hook and prompt) and
names the registered trust scorer that turns the model's log-likelihoods into trust metrics:

    name: truthfulqa
    suite: truthfulness            # truthfulness | bias | robustness
    scorer: truthfulqa_mc          # a registered scorer (slimlm/trust/suites.py)
    task: {type: multiple_choice, reader: csv, path: truthfulqa/TruthfulQA.csv, ...}   # or a task name / .yaml
    limit: 200                     # optional; with seed: a seeded random sample
    options: {}                    # scorer options (robustness: fields, perturbations, rate, seed)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from slimlm.errors import SlimlmError
from slimlm.eval.tasks.spec import TaskSpec, load_task

DEFS = Path(__file__).parent / "defs"
SUITES = ("truthfulness", "bias", "robustness", "privacy")


class TrustSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    suite: Literal["truthfulness", "bias", "robustness"]
    scorer: str
    task: str | dict[str, Any]
    limit: int | None = None
    seed: int | None = None
    options: dict[str, Any] = {}


def builtin_trust_tasks() -> dict[str, str]:
    """{name: suite} of the shipped trust tasks."""
    return {p.stem: yaml.safe_load(p.read_text())["suite"] for p in sorted(DEFS.glob("*.yaml"))}


def load_trust_task(ref: str) -> TrustSpec:
    """A shipped trust task name or a path to a trust YAML."""
    path = Path(ref).expanduser()
    if not ref.endswith((".yaml", ".yml")):
        path = DEFS / f"{ref}.yaml"
    if not path.is_file():
        raise SlimlmError(f"unknown trust task {ref!r}", f"shipped: {', '.join(builtin_trust_tasks())}; or pass a trust .yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return TrustSpec(**raw)
    except yaml.YAMLError as exc:
        raise SlimlmError(f"{path}: invalid YAML ({exc})", "fix the trust task file's syntax") from None
    except (TypeError, ValidationError) as exc:
        msg = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
        raise SlimlmError(f"{path}: trust task field {'.'.join(map(str, msg['loc']))!r}: {msg['msg']}",
                          "see docs/trust.md for the trust task format") from None


def task_spec(t: TrustSpec, limit: int | None = None, seed: int | None = None) -> TaskSpec:
    """The wrapped slimlm task, with the trust task's (or the caller's) ``limit`` and ``seed``."""
    over = {"limit": limit if limit is not None else t.limit, "seed": seed if seed is not None else t.seed}
    if isinstance(t.task, str):
        return load_task(t.task, **over)
    try:
        spec = TaskSpec(name=t.name, **t.task)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SlimlmError(f"trust task {t.name}: task field {'.'.join(map(str, err['loc']))!r}: {err['msg']}",
                          "see docs/evaluation.md for the task format") from None
    return spec.model_copy(update={k: v for k, v in over.items() if v is not None})


def suite_tasks(suites: list[str]) -> list[TrustSpec]:
    """The shipped trust tasks of ``suites`` (``privacy`` has no task file: it trains or reads windows)."""
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise SlimlmError(f"unknown trust suite {bad[0]!r}", f"choose from all, {', '.join(SUITES)}")
    return [load_trust_task(n) for n, s in builtin_trust_tasks().items() if s in suites]
