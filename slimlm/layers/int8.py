"""W8A8 runtime layer: int8 weights (per output channel) × int8 activations (per token, dynamic).

The product really runs in integers, ``int8 × int8 → int32``, then one float rescale by
``x_scale[token] · w_scale[channel]``. Kernels (bit-identical int32 accumulators):
- ``int_mm``: ``torch._int_mm`` on the int8 codes (torch 2.13 CPU accepts any shape; CUDA needs
  M > 16 and K, N multiples of 8);
- ``int32``: the same int8 codes widened to int32 and multiplied by torch's integer GEMM.
- ``auto`` (default): ``int_mm`` for decode-sized inputs (≤ 16 tokens), ``int32`` above — measured
  on the 2-core CPU here, ``torch._int_mm`` matches int32 at one token but is 3–7× slower at
  64–512 tokens (576×1536 weights).
SmoothQuant: Xiao et al. 2023, https://arxiv.org/abs/2211.10438.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.layers import register_format

QMAX = 127
KERNELS = ("auto", "int_mm", "int32")
INT_MM_MAX_ROWS = 16


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``x`` (rows, cols) with one fp32 scale per row (absmax / 127)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / QMAX  # (rows, 1)
    q = torch.round(x.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Exact ``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N), accumulated in int32."""
    on_cpu = a.device.type == "cpu"
    if kernel == "auto":
        kernel = "int_mm" if a.shape[0] <= INT_MM_MAX_ROWS or not on_cpu else "int32"
    if kernel == "int_mm":
        if not on_cpu and a.shape[0] <= INT_MM_MAX_ROWS:  # CUDA's kernel needs M > 16: pad with zero rows
            rows = a.shape[0]
            return torch._int_mm(torch.nn.functional.pad(a, (0, 0, 0, INT_MM_MAX_ROWS + 1 - rows)), b)[:rows]
        return torch._int_mm(a, b)
    if kernel == "int32":
        return a.to(torch.int32) @ b.to(torch.int32)
    raise ValueError(f"unknown int8 kernel {kernel!r}; known: {KERNELS}")


@register_format
class Int8Linear(nn.Module):
    """``y = (q_x @ q_wᵀ) · s_x · s_w + b`` with q_x quantized per token at every call."""

    format = "int8_linear"
    kernel = "auto"  # class default; set_int8_kernel() changes it per module

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        """Quantize a (out, in) weight per output channel; scales are fp16-rounded before coding."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias is not None).to(weight.device)
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-8) / QMAX).to(torch.float16)
        scale = scale.clamp(min=torch.finfo(torch.float16).tiny)
        layer.qweight = torch.round(w / scale.float()[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
        layer.w_scale = scale
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "Int8Linear":
        return cls(**spec)

    def logical_numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight (out, in), for code that reads ``.weight``."""
        return self.qweight.float() * self.w_scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_per_row(x.reshape(-1, self.in_features))  # (M, in) int8, (M, 1)
        acc = int8_matmul(xq, self.qweight.t(), self.kernel)  # (M, out) int32
        y = acc.float() * xs * self.w_scale.float()[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W8A8 per-token, kernel={self.kernel}"


def set_int8_kernel(model: nn.Module, kernel: str) -> int:
    """Choose the integer kernel of every :class:`Int8Linear` in ``model``; returns how many."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; known: {KERNELS}")
    n = 0
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            mod.kernel = kernel
            n += 1
    return n
