"""What slimlm knows about a loaded model: the model, its tokenizer and the facts results carry along.

Kept apart from the loaders so that artifact writing and reading can use it without importing them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from slimlm.models.arch import Arch, arch_for, blocks

MANIFEST = "slimlm.json"


@dataclass
class ModelInfo:
    """Facts about a loaded model that results, reports and artifacts carry along."""

    source: str
    source_kind: str  # default | gguf | hf | artifact
    source_hash: str
    model_type: str
    architecture: str
    n_layers: int
    n_params: int
    dtype: str
    add_bos: bool
    weights_dir: str | None = None  # folder whose weight files this model was read from
    recipe: str | None = None  # recipe YAML of an artifact

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedModel(NamedTuple):
    model: nn.Module
    tokenizer: Any
    info: ModelInfo

    @property
    def arch(self) -> Arch:
        return arch_for(self.info.model_type)


def count_params(model: nn.Module) -> int:
    """Logical parameter count: packed/sparse/factored layers report what they represent."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        logical = getattr(module, "logical_numel", None)
        if callable(logical):
            total += logical()
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself starts every encoding with BOS (Llama-2/3, Mistral, Gemma do; GPT-2-style
    tokenizers such as SmolLM2's do not): evaluation windows then start with BOS too, as in training."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def make_info(model: nn.Module, tokenizer: Any, source: str, kind: str, digest: str, recipe: str | None = None,
              weights_dir: Path | None = None) -> ModelInfo:
    cfg = model.config
    arch = arch_for(cfg.model_type)
    return ModelInfo(
        source=source,
        source_kind=kind,
        source_hash=digest,
        model_type=cfg.model_type,
        architecture=type(model).__name__,
        n_layers=len(blocks(model, arch)),
        n_params=count_params(model),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        add_bos=adds_bos(tokenizer),
        weights_dir=str(weights_dir) if weights_dir else None,
        recipe=recipe,
    )
