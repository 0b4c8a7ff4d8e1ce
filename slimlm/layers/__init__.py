"""Runtime layer formats (packed int, sparse, factored, …), registered by format name.

An artifact's manifest names each replaced module's format and spec; loading rebuilds an empty
module of that format, then fills it from safetensors.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from slimlm.registry import Registry


class LayerFormat(Protocol):
    format: str

    def spec(self) -> dict[str, Any]: ...

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> nn.Module: ...

    def logical_numel(self) -> int: ...


FORMATS: Registry[type[nn.Module]] = Registry("layer format", "slimlm.layers")


def register_format(cls: type[nn.Module]) -> type[nn.Module]:
    FORMATS.register(cls.format, cls)  # type: ignore[attr-defined]
    return cls
