"""LoRA (Hu et al. 2022) and QLoRA-style adapters (Dettmers et al. 2023) through ``peft``.

Plain ``nn.Linear`` layers use peft's own LoRA layer. slimlm's packed 4-bit :class:`QuantLinear` is
not a type peft knows, so :class:`QuantLoraLinear` follows peft's convention for quantized bases
(the pattern of ``peft.tuners.lora.gptq``) and is registered through
``LoraConfig._register_custom_module``: the frozen base dequantizes on the fly, only the low-rank
``B·A`` is trained. Merging adds ``scaling·B·A`` to the dequantized weight and, for a quantized
base, re-rounds it onto a grid of the same bits and group size, so a merged QLoRA model keeps its
packed size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.layers.quant import QuantLinear
from slimlm.layers.sparse import pruned_zeros, restore_zeros
from slimlm.models.arch import Arch, set_module


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA on top of a frozen packed :class:`QuantLinear`: ``y = Q(x) + scaling · B(A(dropout(x)))``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise SlimlmError("DoRA on packed 4-bit layers is not supported", "use plain LoRA (use_dora=False)")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            result = result + b(a(self.lora_dropout[name](x.to(a.weight.dtype)))).to(result.dtype) * self.scaling[name]
        return result

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling · B @ A, shape (out, in)."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def target_leaves(arch: Arch) -> list[str]:
    """Leaf names of every block linear (q, k, v, o, gate, up, down) — architecture data, not a per-model list."""
    return list(dict.fromkeys(n for n in (arch.q, arch.k, arch.v, arch.o, arch.gate, arch.up, arch.down) if n))


def lora_config(arch: Arch, r: int, alpha: float, dropout: float = 0.0) -> LoraConfig:
    if r < 1:
        raise SlimlmError(f"LoRA rank r={r} must be ≥ 1", "use e.g. r=8 or r=16")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_leaves(arch), bias="none")
    cfg._register_custom_module({QuantLinear: QuantLoraLinear})
    return cfg


def add_lora(model: nn.Module, arch: Arch, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on every block linear; only adapter weights stay trainable.

    peft injects the adapters into ``model``'s own modules, so the original object is changed in place.
    """
    return get_peft_model(model, lora_config(arch, r, alpha, dropout))


def save_adapters(peft_model: nn.Module, folder: str | Path) -> Path:
    """Adapters only (``adapter_model.safetensors`` + ``adapter_config.json``), a few MB."""
    folder = Path(folder)
    peft_model.save_pretrained(str(folder))
    return folder


def load_adapters(model: nn.Module, folder: str | Path) -> nn.Module:
    """Attach adapters saved by :func:`save_adapters` to a model of the same shape (packed or not)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise SlimlmError(f"{folder} holds no adapter_config.json", "pass the folder written by save_adapters / --lora-out")
    cfg = LoraConfig.from_pretrained(str(folder))
    cfg._register_custom_module({QuantLinear: QuantLoraLinear})
    return PeftModel.from_pretrained(model, str(folder), config=cfg)


Requantizer = Callable[[QuantLinear, torch.Tensor], nn.Module]


@torch.no_grad()
def merge_lora(peft_model: nn.Module, requantize: Requantizer | None = None) -> nn.Module:
    """Fold every adapter into its base weight and return the plain model (peft wrappers removed).

    A packed base becomes ``requantize(base, merged weight)`` — e.g. a re-rounded :class:`QuantLinear`
    from :func:`slimlm.methods.quant.rtn.requantize_like` — or, without one, a dense ``nn.Linear``.
    Weights a pruning step zeroed stay zero: the dense adapter delta is masked to the kept weights.
    """
    zeros = pruned_zeros(peft_model.get_base_model())
    for name, mod in list(peft_model.named_modules()):
        if not isinstance(mod, QuantLoraLinear):
            continue
        base: QuantLinear = mod.base_layer
        w = base.weight_dequantized()
        for adapter in mod.active_adapters:
            if adapter in mod.lora_A:
                w = w + mod.delta_weight(adapter).to(w.dtype)
        if requantize is not None:
            new = requantize(base, w)
        else:
            new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None).to(w.device)
            new.weight.copy_(w)
            if base.bias is not None:
                new.bias.copy_(base.bias)
        set_module(peft_model, name, new)
    merged = peft_model.merge_and_unload()
    restore_zeros(zeros)
    return merged

