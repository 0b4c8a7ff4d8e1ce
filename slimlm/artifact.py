"""The slimlm artifact: a folder with safetensors weights, config, tokenizer, ``recipe.yaml`` and a
``slimlm.json`` manifest naming the format of every replaced module.

Writes go to a temporary sibling folder that is renamed into place at the end, so an interrupted
run never leaves a half-written artifact.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.layers import FORMATS
from slimlm.models.info import MANIFEST, LoadedModel
from slimlm.models.manifest import file_hash
from slimlm.models.manifest import FORMAT_VERSION, WEIGHTS, load_artifact, read_manifest
from slimlm.version import __version__

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def git_hash() -> str | None:
    """The slimlm checkout's commit, when running from one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def layer_formats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module in a registered runtime format, with the spec that rebuilds it empty."""
    return {
        name: {"format": mod.format, "spec": mod.spec()}
        for name, mod in model.named_modules()
        if getattr(mod, "format", None) in FORMATS.names()
    }


def storage_round(model: nn.Module, storage_dtype: str) -> None:
    """Round floating parameters through the storage dtype in memory, so a reload is bit-identical."""
    dt = DTYPES[storage_dtype]
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dt:
                for part in p.view(-1).split(1 << 20):  # in slices: no second copy of a large table
                    part.copy_(part.to(dt).to(p.dtype))


def _tensors_for_disk(model: nn.Module, storage_dtype: str) -> dict[str, torch.Tensor]:
    dt = DTYPES[storage_dtype]
    params = {id(p) for p in model.parameters()}
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = id(t)
        if key in seen:  # tied weights are stored once
            continue
        seen[key] = name
        t = t.detach()
        if key in params and t.is_floating_point():
            t = t.to(dt)
        out[name] = t.contiguous().cpu()
    return out


def save_artifact(lm: LoadedModel, out: str | Path, *, recipe_yaml: str, storage_dtype: str,
                  report: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``lm`` as an artifact folder at ``out`` atomically; returns the folder."""
    out = check_output(out, overwrite=overwrite)
    tmp: Path | None = None
    try:
        with _signals_deferred():  # a Ctrl-C just after mkdtemp must still find `tmp` set for the cleanup
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        save_file(_tensors_for_disk(lm.model, storage_dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        lm.model.config.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        manifest = {
            "slimlm_format": FORMAT_VERSION,
            "slimlm_version": __version__,
            "git_hash": git_hash(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
            "source": {"path": lm.info.source, "kind": lm.info.source_kind, "hash": lm.info.source_hash,
                       "n_params": report.get("source_params")},
            "storage_dtype": storage_dtype,
            "weights": {"file": WEIGHTS, "bytes": (tmp / WEIGHTS).stat().st_size, "sha256": file_hash(tmp / WEIGHTS)},
            "layers": layer_formats(lm.model),
            "report": report,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        with _signals_deferred():  # a Ctrl-C here would leave neither the old nor the new folder
            if out.exists():
                trash = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, trash)
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except OSError as exc:  # disk full, permissions: nothing half-written stays behind (finally below)
        raise _write_error(exc, out) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse, before any slow work, an output folder that exists (without ``overwrite``) or cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimlmError(f"output folder {out} already exists", "choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"--out {out} is a file", "choose a folder path for the artifact")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, out) from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise SlimlmError(f"cannot write the artifact: {out.parent} is not writable", "choose a folder you can write to (--out)")
    return out


def _write_error(exc: OSError, out: Path) -> SlimlmError:
    if exc.errno == errno.ENOSPC:
        return SlimlmError(f"no space left on the device while writing {out}", "free disk space or choose another --out")
    return SlimlmError(f"cannot write the artifact {out}: {exc.strerror or exc}", "choose a folder you can write to (--out)")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the two renames that swap the artifact in (delivered right after)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


__all__ = ["DTYPES", "FORMAT_VERSION", "WEIGHTS", "check_output", "load_artifact", "read_manifest", "save_artifact", "storage_round"]
