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
from safetensors.torch import load_file, save_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.layers import FORMATS
from slimlm.models.arch import set_module
from slimlm.models.load import MANIFEST, LoadedModel, file_hash, make_info

WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
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
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise _write_error(exc, out) from None
    try:
        save_file(_tensors_for_disk(lm.model, storage_dtype), str(tmp / WEIGHTS), metadata={"format": "pt"})
        lm.model.config.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        manifest = {
            "slimlm_format": FORMAT_VERSION,
            "slimlm_version": _version(),
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


def _version() -> str:
    from slimlm import __version__

    return __version__


REMAKE = "re-create the artifact with `slimlm compress`"
REQUIRED = {"slimlm_format": int, "source": dict, "layers": dict}


def read_manifest(path: Path) -> dict[str, Any]:
    """The artifact's manifest, checked for shape: a damaged or hand-edited one is one line, not a KeyError."""
    where = path / MANIFEST
    try:
        manifest = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimlmError(f"{where} is not valid JSON ({exc})", REMAKE) from None
    if not isinstance(manifest, dict):
        raise SlimlmError(f"{where} is not a JSON object", REMAKE)
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise SlimlmError(f"{where} lacks {key!r} (or it is not a {kind.__name__})", REMAKE)
    if not isinstance(manifest["source"].get("hash"), str):
        raise SlimlmError(f"{where}: 'source' lacks the source model's 'hash'", REMAKE)
    if manifest["slimlm_format"] > FORMAT_VERSION:
        raise SlimlmError(f"{path} was written by a newer slimlm (format {manifest['slimlm_format']})", "upgrade slimlm")
    for name, entry in manifest["layers"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("format"), str) and isinstance(entry.get("spec"), dict)):
            raise SlimlmError(f"{where}: layer {name!r} needs a 'format' name and a 'spec' mapping", REMAKE)
    return manifest


def _check_weights_file(weights: Path, manifest: dict[str, Any]) -> None:
    """Size and sha256 recorded at save time (artifacts from before they were recorded skip this)."""
    rec = manifest.get("weights")
    if not isinstance(rec, dict):
        return
    size = weights.stat().st_size
    if rec.get("bytes") is not None and size != rec["bytes"]:
        raise SlimlmError(f"{weights} is {size} bytes, its manifest says {rec['bytes']} (truncated or replaced)", REMAKE)
    if rec.get("sha256") and file_hash(weights) != rec["sha256"]:
        raise SlimlmError(f"{weights} does not match the sha256 in its manifest (changed after it was written)", REMAKE)


def load_artifact(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild the model skeleton, swap in the recorded layer formats, then load the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise SlimlmError(f"{weights} is missing", REMAKE)
    _check_weights_file(weights, manifest)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise SlimlmError(f"{weights} is not a valid safetensors file ({exc})", REMAKE) from None
    config = AutoConfig.from_pretrained(str(path))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    for name, entry in manifest["layers"].items():
        fmt = FORMATS.get(entry["format"])  # an unknown name is one line with "did you mean"
        try:
            set_module(model, name, fmt.empty(entry["spec"]))
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise SlimlmError(f"{path / MANIFEST}: layer {name!r} ({entry['format']}) does not fit this model ({exc})", REMAKE) from None
    for mod in model.modules():  # formats that share another module's tensors (a tied quantized head)
        if callable(getattr(mod, "bind", None)):
            mod.bind(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes in the manifest's specs disagree with the stored tensors
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise SlimlmError(f"{weights} does not match its manifest's layer formats ({first})", REMAKE) from None
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and getattr(head, "format", None) is None:
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SlimlmError(
            f"{weights} does not match its manifest (missing {missing[:3]}, unexpected {unexpected[:3]})",
            REMAKE,
        )
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    recipe = (path / "recipe.yaml").read_text() if (path / "recipe.yaml").is_file() else None
    info = make_info(model, tok, str(path), "artifact", manifest["source"]["hash"], recipe, weights_dir=path)
    return LoadedModel(model, tok, info)
