"""Lazy name → object registries with "did you mean" errors.

Modules register themselves on import; a registry imports every module of its package the first
time a name is looked up, so adding an algorithm means adding one file and nothing else.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Generic, TypeVar

from slimlm.errors import SlimlmError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; discovers the modules of ``package`` on first lookup."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str, obj: T) -> T:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.walk_packages(pkg.__path__, prefix=f"{self.package}."):
            importlib.import_module(mod.name)

    def get(self, name: str) -> T:
        self._discover()
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(self._items))}"
            raise SlimlmError(f"unknown {self.kind} {name!r}", hint)
        return self._items[name]

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._items)
