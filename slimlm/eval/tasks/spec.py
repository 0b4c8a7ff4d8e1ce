"""Task definitions as data: a YAML file per task (shipped ones in ``defs/``, or the user's own).

A task names a reader (how to read the file), an optional registered hook (how to reshape each raw
document; a name in :data:`slimlm.eval.tasks.hooks.HOOKS`, never a module path, so a task file
cannot make slimlm import code), and format strings that turn a document into a context and its choices, in the manner
of lm-evaluation-harness's ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from slimlm.errors import SlimlmError
from slimlm.eval.tasks.hooks import HOOKS

DEFS = Path(__file__).parent / "defs"
TaskType = Literal["multiple_choice", "generation", "perplexity"]


class TaskSpec(BaseModel):
    """One task. ``choices`` is a list of format strings or the name of a list field; ``gold`` a field
    name or a constant index; ``delimiter`` goes between context and each choice (lm-eval's
    ``target_delimiter``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: TaskType
    reader: str = "jsonl"
    path: str
    reader_options: dict[str, Any] = {}
    process_doc: str | None = None
    text: str = ""
    choices: list[str] | str = "choices"
    gold: str | int = "label"
    delimiter: str = " "
    answers: str = "answers"
    until: list[str] = ["\n"]
    max_gen_toks: int = Field(32, ge=1)
    window: int = Field(512, ge=2)
    max_tokens: int | None = Field(None, ge=2)
    metrics: list[str] = []
    limit: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in DEFS.glob("*.yaml"))


def _parse(text: str, where: str) -> TaskSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise SlimlmError(f"{where}{line}: invalid YAML ({getattr(exc, 'problem', exc)})", "fix the task file's syntax") from None
    if not isinstance(raw, dict):
        raise SlimlmError(f"{where}: a task file must be a YAML mapping", "see docs/evaluation.md for the task format")
    return _validated(raw, where)


def _validated(raw: dict[str, Any], where: str) -> TaskSpec:
    try:
        spec = TaskSpec(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise SlimlmError(f"{where}: task field {field!r}: {err['msg']}", "see docs/evaluation.md for the task format") from None
    if spec.process_doc is not None and spec.process_doc not in HOOKS.names():
        raise SlimlmError(
            f"{where}: process_doc {spec.process_doc!r} is not a registered hook (task files may not import code)",
            f"use one of {', '.join(HOOKS.names())}, or register yours from Python: "
            "slimlm.eval.tasks.hooks.HOOKS.register(name, fn)")
    return spec


def load_task(ref: str, **overrides: Any) -> TaskSpec:
    """A builtin task name, a path to a task YAML, or ``name=DATA`` (a builtin task over another file,
    e.g. ``piqa=my_piqa.jsonl`` in PIQA's fields, read as JSONL). ``overrides`` replace fields."""
    name, _, data = ref.partition("=")
    path = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise SlimlmError(f"task file {path} not found", "pass an existing .yaml task file or a builtin task name")
        spec = _parse(path.read_text(encoding="utf-8"), str(path))
    elif (DEFS / f"{name}.yaml").is_file():
        spec = _parse((DEFS / f"{name}.yaml").read_text(encoding="utf-8"), name)
    else:
        import difflib

        close = difflib.get_close_matches(name, builtin_tasks(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"builtin tasks: {', '.join(builtin_tasks())}; or pass a task .yaml"
        raise SlimlmError(f"unknown task {name!r}", hint)
    if data:
        overrides = {"path": data, "reader": "text" if spec.type == "perplexity" else "jsonl", "reader_options": {}, **overrides}
    return _validated({**spec.model_dump(), **{k: v for k, v in overrides.items() if v is not None}}, name)
