"""Reading a slimlm artifact back: the manifest names each replaced module's format, so the model
skeleton is rebuilt empty, those modules are swapped in, and the weights are loaded strictly.

Writing lives in :mod:`slimlm.artifact`; this side needs only the model facts and the layer formats.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from slimlm.errors import SlimlmError
from slimlm.layers import FORMATS
from slimlm.models.arch import set_module
from slimlm.models.info import MANIFEST, LoadedModel, make_info

WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
