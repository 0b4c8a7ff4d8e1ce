"""Packed integer token embeddings, and an output head that reads the same codes when the two are tied.

The embedding table is the largest single matrix of a small LM (SmolLM2-135M: 28 M of 135 M weights;
Gemma-3-270M: 168 M of 268 M), so a 4-bit model whose table stays in fp16 is still half table on
disk. Like llama.cpp's ``token_embd`` types, the table is stored as b-bit codes with per-group
scales; a lookup gathers and dequantizes only the rows it needs. A tied head (``lm_head`` sharing the
table) multiplies by the same codes, dequantized in vocabulary chunks so no full fp32 copy exists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.layers import register_format
from slimlm.layers.quant import QuantLinear, dequantize, unpack_bits

HEAD_CHUNK_ROWS = 8192  # vocabulary rows dequantized at a time by the tied head


@register_format
class QuantEmbedding(QuantLinear):
    """``nn.Embedding`` over packed codes: rows are the ``out_features`` (vocabulary) of the grid."""

    format = "quant_embedding"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 embed_scale: float | None = None) -> None:
        if (in_features * bits) % 8:
            raise ValueError(f"a {bits}-bit embedding row of {in_features} codes does not fill whole bytes")
        super().__init__(in_features, out_features, bits, group_size, bias=False)
        self.embed_scale = embed_scale  # Gemma multiplies embeddings by √d inside its embedding module
        # follows the model's float dtype through .to(): lookups have no float input to take it from
        self.register_buffer("dtype_probe", torch.empty(0), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "embed_scale": self.embed_scale}

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ``start:stop`` of the table, (stop - start, in)."""
        row_bytes = self.in_features * self.bits // 8
        packed = self.qweight[start * row_bytes : stop * row_bytes]
        q = unpack_bits(packed, self.bits, (stop - start) * self.in_features).reshape(-1, self.in_features)
        return dequantize(q, self.scales[start:stop], self.zeros[start:stop], self.group_size, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        row_bytes = self.in_features * self.bits // 8
        flat = input_ids.reshape(-1)
        packed = self.qweight.view(self.out_features, row_bytes)[flat]  # (n, row_bytes)
        q = unpack_bits(packed.reshape(-1), self.bits, flat.numel() * self.in_features)
        x = dequantize(q.reshape(-1, self.in_features), self.scales[flat], self.zeros[flat], self.group_size,
                       self.dtype_probe.dtype)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x.reshape(*input_ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"vocab={self.out_features}, dim={self.in_features}, bits={self.bits}, group_size={self.group_size}"


@register_format
class TiedQuantHead(nn.Module):
    """``lm_head`` tied to a :class:`QuantEmbedding`: logits from the shared codes, no tensors of its own."""

    format = "tied_quant_head"

    def __init__(self, tied_to: str, in_features: int, out_features: int) -> None:
        super().__init__()
        self.tied_to, self.in_features, self.out_features = tied_to, in_features, out_features
        self._table: QuantEmbedding | None = None  # set by bind(); kept out of the module tree (stored once)

    @classmethod
    def tie(cls, root: nn.Module, tied_to: str) -> "TiedQuantHead":
        table = root.get_submodule(tied_to)
        head = cls(tied_to, table.in_features, table.out_features)
        head.bind(root)
        return head

    def bind(self, root: nn.Module) -> None:
        """Point at the embedding module named by ``tied_to`` (after a load rebuilt the model)."""
        table = root.get_submodule(self.tied_to)
        if not isinstance(table, QuantEmbedding):
            raise TypeError(f"{self.tied_to} is {type(table).__name__}, not a QuantEmbedding")
        object.__setattr__(self, "_table", table)

    def spec(self) -> dict[str, Any]:
        return {"tied_to": self.tied_to, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "TiedQuantHead":
        return cls(**spec)

    def logical_numel(self) -> int:
        return 0  # the weights are the embedding's, counted there

    @property
    def weight(self) -> torch.Tensor:
        assert self._table is not None, "TiedQuantHead used before bind()"
        return self._table.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._table
        assert table is not None, "TiedQuantHead used before bind()"
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, HEAD_CHUNK_ROWS):
            stop = min(start + HEAD_CHUNK_ROWS, self.out_features)
            out[..., start:stop] = F.linear(x, table.rows(start, stop, x.dtype))
        return out

    def extra_repr(self) -> str:
        return f"tied_to={self.tied_to}, vocab={self.out_features}"
