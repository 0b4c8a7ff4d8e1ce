"""Compact storage for pruned linears, so that sparsity saves bytes on disk instead of storing zeros.

Three formats, all exact (the dense weight they decode to is bit-identical to the pruned one):

* ``sparse_linear`` — 1-bit keep mask (packed) + the kept values in the storage dtype:
  ``1 + 16·density`` bits per weight in fp16 (9 bits at 50 %).
* ``nm_sparse_linear`` — N:M (2:4, 4:8): per group of ``m`` inputs, ``n`` values + ``n`` indices of
  ``ceil(log2 m)`` bits, the layout sparse tensor cores use (2:4: 9 bits per weight in fp16).
* ``sparse_quant_linear`` — keep mask + packed b-bit codes of the kept weights + group scales/zeros
  (the SparseGPT joint sparse + int4 result): ``1 + 4·density`` bits per weight at 4 bits.

How layers get here: pruning methods leave plain ``nn.Linear`` layers with exact zeros (so later
steps such as RTN/GPTQ still see ordinary linears) and mark each pruned *module* with its pattern
(attribute :data:`SPARSE_ATTR`). The mark travels with the module — through layer drop's
renumbering, and onto the layer that replaces it (``slimlm.models.arch.set_module``) — so no table of
names can go stale. :func:`compact_sparse`, run when an artifact is finalised, converts each marked
layer — still a plain linear, or now a ``QuantLinear`` whose zeros survived quantization — into an
exact format above (N:M layout for N:M patterns, else the bitmask), only where that saves bytes.

CPU runtime: measured on this project's 2-core CPU, ``torch.sparse`` CSR matmuls are 3–15×
*slower* than a dense matmul at 50 % sparsity, and semi-structured (2:4) kernels are
CUDA-only. So the forward decodes the weight once into a cached dense tensor (not saved; dropped on
``load_state_dict`` and ``.to``): decode speed equals dense, disk size is what shrinks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.layers import register_format
from slimlm.layers.quant import QuantLinear, dequantize, pack_bits, unpack_bits

SPARSE_ATTR = "slimlm_sparse"  # module attribute: "unstructured" | "n:m", set by pruning steps on the layers they prune


class _CachedDense(nn.Module):
    """Base: subclasses define ``_decode(dtype)``; the decoded weight is cached until the stored
    tensors are reloaded (``load_state_dict``) or moved (``.to``/``.half``…)."""

    in_features: int
    out_features: int

    def __init__(self) -> None:
        super().__init__()
        self._cache: torch.Tensor | None = None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._cache is None or self._cache.dtype != dtype:
            self._cache = self._decode(dtype)
        return self._cache

    def _decode(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """Dense equivalent, so code that reads ``.weight`` (stats, errors, export) keeps working."""
        return self.dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(x.dtype), self.bias)


def _scatter(mask_bits: torch.Tensor, values: torch.Tensor, fill: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense (out, in) tensor: ``fill`` everywhere, ``values`` (row-major order) where the packed mask is set."""
    mask = unpack_bits(mask_bits, 1, shape[0] * shape[1]).bool().reshape(shape)
    return fill.masked_scatter(mask, values.to(fill.dtype))


@register_format
class SparseLinear(_CachedDense):
    """Unstructured sparse weight: packed keep mask + kept values (row-major)."""

    format = "sparse_linear"

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool, dtype: str = "float16") -> None:
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.register_buffer("mask", torch.zeros(math.ceil(in_features * out_features / 8), dtype=torch.uint8))
        self.register_buffer("values", torch.zeros(nnz, dtype=getattr(torch, dtype)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "SparseLinear":
        keep = w != 0  # (out, in)
        layer = cls(w.shape[1], w.shape[0], int(keep.sum()), bias is not None, str(dtype).removeprefix("torch."))
        layer.mask = pack_bits(keep, 1)
        layer.values = w[keep].to(dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer.to(w.device)

    def _decode(self, dtype: torch.dtype) -> torch.Tensor:
        zeros = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.values.device)
        return _scatter(self.mask, self.values, zeros, (self.out_features, self.in_features))

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "nnz": self.nnz,
                "bias": self.bias is not None, "dtype": str(self.values.dtype).removeprefix("torch.")}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "SparseLinear":
        return cls(**spec)

    def logical_numel(self) -> int:
        """Free parameters: the kept weights (+ bias)."""
        return self.nnz + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, density={self.nnz / (self.in_features * self.out_features):.3f}"


@register_format
class NMSparseLinear(_CachedDense):
    """N:M weight: ``n`` values and ``n`` packed in-group indices per group of ``m`` inputs."""

    format = "nm_sparse_linear"

    def __init__(self, in_features: int, out_features: int, n: int, m: int, bias: bool, dtype: str = "float16") -> None:
        super().__init__()
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        self.index_bits = max(1, math.ceil(math.log2(m)))
        kept = out_features * (in_features // m) * n
        self.register_buffer("values", torch.zeros(kept, dtype=getattr(torch, dtype)))
        self.register_buffer("indices", torch.zeros(math.ceil(kept * self.index_bits / 8), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @staticmethod
    def fits(w: torch.Tensor, n: int, m: int) -> bool:
        """True when every group of ``m`` consecutive inputs holds at most ``n`` nonzeros."""
        return w.shape[1] % m == 0 and bool(((w != 0).reshape(w.shape[0], -1, m).sum(2) <= n).all())

    @classmethod
    def from_dense(cls, w: torch.Tensor, bias: torch.Tensor | None, n: int, m: int, dtype: torch.dtype) -> "NMSparseLinear":
        layer = cls(w.shape[1], w.shape[0], n, m, bias is not None, str(dtype).removeprefix("torch."))
        groups = w.reshape(w.shape[0], -1, m)  # (out, in/m, m)
        # nonzeros first, then by position: groups with fewer than n nonzeros pad with stored zeros
        rank = (groups != 0).float() * 2 * m - torch.arange(m, device=w.device)
        idx = torch.topk(rank, n, dim=2).indices.sort(dim=2).values  # (out, in/m, n)
        layer.values = groups.gather(2, idx).reshape(-1).to(dtype)
        layer.indices = pack_bits(idx, layer.index_bits)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer.to(w.device)

    def _decode(self, dtype: torch.dtype) -> torch.Tensor:
        g = self.in_features // self.m
        idx = unpack_bits(self.indices, self.index_bits, self.values.numel()).long().reshape(self.out_features, g, self.n)
        vals = self.values.to(dtype).reshape(self.out_features, g, self.n)
        dense = torch.zeros(self.out_features, g, self.m, dtype=dtype, device=self.values.device)
        return dense.scatter_(2, idx, vals).reshape(self.out_features, self.in_features)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "n": self.n, "m": self.m,
                "bias": self.bias is not None, "dtype": str(self.values.dtype).removeprefix("torch.")}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "NMSparseLinear":
        return cls(**spec)

    def logical_numel(self) -> int:
        return self.values.numel() + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, pattern={self.n}:{self.m}"


@register_format
class SparseQuantLinear(_CachedDense):
    """Sparse + quantized: packed keep mask + packed ``bits``-bit codes of kept weights + group grid."""

    format = "sparse_quant_linear"

    def __init__(self, in_features: int, out_features: int, nnz: int, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.bits, self.group_size = bits, group_size
        n_groups = math.ceil(in_features / group_size)
        self.register_buffer("mask", torch.zeros(math.ceil(in_features * out_features / 8), dtype=torch.uint8))
        self.register_buffer("qvalues", torch.zeros(math.ceil(nnz * bits / 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _zero_codes(self) -> torch.Tensor:
        """Each weight's zero-point code, (out, in): the code that decodes to exactly 0."""
        return self.zeros.repeat_interleave(self.group_size, dim=1)[:, : self.in_features].to(torch.int32)

    @classmethod
    def from_quant(cls, ql: QuantLinear) -> "SparseQuantLinear":
        codes = ql.codes()  # (out, in) int32
        layer = cls(ql.in_features, ql.out_features, 0, ql.bits, ql.group_size, ql.bias is not None)
        layer.scales, layer.zeros = ql.scales.clone(), ql.zeros.clone()
        keep = codes != layer._zero_codes()  # pruned weights (and weights that round to 0) decode to 0
        layer.nnz = int(keep.sum())
        layer.mask = pack_bits(keep, 1)
        layer.qvalues = pack_bits(codes[keep], ql.bits)
        if ql.bias is not None:
            layer.bias = nn.Parameter(ql.bias.detach().clone())
        return layer.to(ql.scales.device)

    def codes(self) -> torch.Tensor:
        kept = unpack_bits(self.qvalues, self.bits, self.nnz)
        return _scatter(self.mask, kept, self._zero_codes(), (self.out_features, self.in_features))

    def _decode(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "nnz": self.nnz, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "SparseQuantLinear":
        return cls(**spec)

    def logical_numel(self) -> int:
        return self.nnz + (self.out_features if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"density={self.nnz / (self.in_features * self.out_features):.3f}")


def compact_layer(mod: nn.Module, pattern: str, dtype: torch.dtype) -> nn.Module | None:
    """The exact compact form of a pruned layer, or ``None`` when it would not save bytes."""
    if type(mod) is QuantLinear:
        sq = SparseQuantLinear.from_quant(mod)
        return sq if sq.mask.numel() + sq.qvalues.numel() < mod.qweight.numel() else None
    if type(mod) is not nn.Linear:
        return None  # already compact, factored, … : leave it alone
    w = mod.weight.detach()
    n, m = (int(v) for v in pattern.split(":")) if pattern != "unstructured" else (0, 0)
    # N:M keeps its fixed layout (what sparse kernels consume) even when native zeros make the bitmask a little smaller
    new: nn.Module = (NMSparseLinear.from_dense(w, mod.bias, n, m, dtype) if n and NMSparseLinear.fits(w, n, m)
                      else SparseLinear.from_dense(w, mod.bias, dtype))
    stored = sum(b.numel() * b.element_size() for b in new.buffers())
    return new if stored < w.numel() * torch.finfo(dtype).bits // 8 else None

def mark_sparse(module: nn.Module, pattern: str) -> None:
    """Record on ``module`` itself that a pruning step left exact zeros in it with ``pattern``."""
    setattr(module, SPARSE_ATTR, pattern)


def sparse_pattern(module: nn.Module) -> str | None:
    return getattr(module, SPARSE_ATTR, None)


def _marked(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, child) for every marked module, found where it sits now."""
    return [(parent, leaf, child) for parent in model.modules() for leaf, child in parent.named_children()
            if sparse_pattern(child) is not None]


@torch.no_grad()
def compact_sparse(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Convert every marked layer to a compact format; returns {name: format} of those converted."""
    names = {id(m): n for n, m in model.named_modules()}
    done: dict[str, str] = {}
    for parent, leaf, mod in _marked(model):
        new = compact_layer(mod, sparse_pattern(mod), dtype)  # type: ignore[arg-type]
        delattr(mod, SPARSE_ATTR)
        if new is not None:
            setattr(parent, leaf, new)
            done[names[id(mod)]] = new.format
    return done


def pruned_zeros(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """Weight → (out, in) mask of its exact zeros, for every dense layer a pruning step marked.

    Training after pruning (recovery, distillation, merged LoRA) must put these zeros back after
    each update, or the sparsity — and the compact storage it buys at the end — is silently lost.
    Layers under a peft adapter are read through their ``base_layer`` (peft keeps the marked module there).
    """
    zeros: dict[nn.Parameter, torch.Tensor] = {}
    for mod in model.modules():
        if sparse_pattern(mod) is not None and isinstance(mod, nn.Linear):
            zeros[mod.weight] = mod.weight.detach() == 0
    return zeros


@torch.no_grad()
def restore_zeros(zeros: dict[nn.Parameter, torch.Tensor]) -> None:
    """Set the recorded zeros of :func:`pruned_zeros` back to zero, in place."""
    for weight, mask in zeros.items():
        weight.masked_fill_(mask, 0)
