"""Export slimlm models to the runtimes people deploy on: GGUF (llama.cpp), compressed-tensors (vLLM,
transformers) and ONNX (onnxruntime).

Each writer is a pure function from slimlm's stored formats (``slimlm.layers``) to the target's own
layout, registered by format name. Calibrated codes are carried over as they are — no dequantize and
re-round — wherever the target can hold them; where it cannot, the writer refuses naming the layer
and the nearest option, or re-rounds only when asked (``requantize``) and reports the error it adds.
Every write goes to a temporary sibling that is renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.models.load import LoadedModel
from slimlm.registry import Registry


@dataclass
class ExportResult:
    """What an export wrote: the path, its size, and the type each tensor got."""

    path: Path
    format: str
    bytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)  # target tensor name → its type in the file
    added_error: dict[str, float] = field(default_factory=dict)  # layer → relative error a re-rounding added
    notes: list[str] = field(default_factory=list)


Writer = Callable[..., ExportResult]
WRITERS: Registry[Writer] = Registry("export format", "slimlm.export")


def register_writer(name: str) -> Callable[[Writer], Writer]:
    def deco(fn: Writer) -> Writer:
        WRITERS.register(name, fn)
        return fn

    return deco


def path_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextmanager
def atomic_output(out: str | os.PathLike[str], *, overwrite: bool, folder: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` (a file path or a created folder); rename it into place on success.

    On any failure the temporary is removed and an existing ``out`` is left untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimlmError(f"{out} already exists", "choose another --out or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise SlimlmError(f"cannot write to {out.parent} ({exc.strerror or exc})", "choose a writable --out location") from None
    target = tmp if folder else tmp / out.name
    try:
        yield target
        if out.exists():  # --overwrite: swap, so a crash between the two renames still leaves one intact copy
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(target, out)
            shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink(missing_ok=True)
        else:
            os.replace(target, out)
    except OSError as exc:
        raise SlimlmError(f"writing {out} failed ({exc.strerror or exc}); nothing was left behind",
                          "free disk space or choose a writable --out location") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(model: LoadedModel | str | os.PathLike[str], out: str | os.PathLike[str], *, format: str = "gguf",
           overwrite: bool = False, **options: Any) -> ExportResult:
    """Write ``model`` (a loaded model, an artifact folder, a checkpoint or ``default``) as ``format`` at ``out``.

    ``options`` go to the writer: GGUF takes ``type`` (for float matrices) and ``requantize``.
    """
    writer = WRITERS.get(format)
    if not isinstance(model, LoadedModel):
        from slimlm.models import load

        model = load(model)
    return writer(model, Path(out), overwrite=overwrite, **options)


__all__ = ["ExportResult", "WRITERS", "atomic_output", "export", "register_writer"]
