"""Reading a slimlm artifact back: the manifest names each replaced module's format, so the model
skeleton is rebuilt empty, those modules are swapped in, and the weights are loaded strictly.

Writing lives in :mod:`slimlm.artifact`; this side needs only the model facts and the layer formats.
"""

from __future__ import annotations

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


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise SlimlmError(f"{path / MANIFEST} is not valid JSON ({exc})", "re-create the artifact with `slimlm compress`") from None
    if manifest.get("slimlm_format", 0) > FORMAT_VERSION:
        raise SlimlmError(f"{path} was written by a newer slimlm (format {manifest['slimlm_format']})", "upgrade slimlm")
    return manifest


def load_artifact(path: Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild the model skeleton, swap in the recorded layer formats, then load the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise SlimlmError(f"{weights} is missing", "re-create the artifact with `slimlm compress`")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise SlimlmError(f"{weights} is not a valid safetensors file ({exc})", "re-create the artifact with `slimlm compress`") from None
    config = AutoConfig.from_pretrained(str(path))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    for name, entry in manifest["layers"].items():
        set_module(model, name, FORMATS.get(entry["format"]).empty(entry["spec"]))
    for mod in model.modules():  # formats that share another module's tensors (a tied quantized head)
        if callable(getattr(mod, "bind", None)):
            mod.bind(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and getattr(head, "format", None) is None:
        model.tie_weights()
        tied = {k for k in missing if k.endswith("lm_head.weight")}
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise SlimlmError(
            f"{weights} does not match its manifest (missing {missing[:3]}, unexpected {unexpected[:3]})",
            "re-create the artifact with `slimlm compress`",
        )
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    recipe = (path / "recipe.yaml").read_text() if (path / "recipe.yaml").is_file() else None
    info = make_info(model, tok, str(path), "artifact", manifest["source"]["hash"], recipe, weights_dir=path)
    return LoadedModel(model, tok, info)
