"""``router.yaml``: the cascade as data — tiers, the confidence signal, thresholds, the privacy rule.

A tier is a local slimlm model (``model:``) or an OpenAI-compatible endpoint (``url:`` plus the name of
an environment variable holding its key, so secrets never sit in the file). ``slimlm route tune``
fills in the thresholds; ``slimlm serve --router`` serves the cascade.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from slimlm.errors import SlimlmError
from slimlm.route.pii import KINDS


class TierSpec(BaseModel):
    """One model of the cascade. ``threshold``: answer here when confidence ≥ it, else escalate."""

    model_config = ConfigDict(extra="forbid")

    name: str
    model: str | None = None
    url: str | None = None
    api_key_env: str | None = None
    remote_model: str = "default"
    threshold: float | None = None
    cost: float = 1.0
    timeout_s: float = 120.0

    @model_validator(mode="after")
    def _one_source(self) -> "TierSpec":
        if (self.model is None) == (self.url is None):
            raise ValueError(f"tier {self.name!r} needs exactly one of `model` (local) or `url` (remote endpoint)")
        return self

    @property
    def remote(self) -> bool:
        return self.url is not None

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise SlimlmError(f"tier {self.name!r}: environment variable {self.api_key_env} is not set",
                              f"export {self.api_key_env}=<the endpoint's API key>")
        return key


class PrivacySpec(BaseModel):
    """``local``: requests with private spans never leave the local tiers; ``mask``: they may, with every
    span replaced by a placeholder (restored in the answer); ``off``: no detection."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["local", "mask", "off"] = "mask"
    kinds: list[str] = list(KINDS)

    @model_validator(mode="after")
    def _known(self) -> "PrivacySpec":
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown private-span kind {bad[0]!r} (known: {', '.join(KINDS)})")
        return self


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "router"
    signal: str = "lp_q10"
    samples: int = 5  # k, for the agreement signal
    sample_temperature: float = 0.8
    learned: dict[str, Any] | None = None
    tiers: list[TierSpec]
    privacy: PrivacySpec = PrivacySpec()
    log: str | None = "route-decisions.jsonl"
    tuned: dict[str, Any] | None = None  # what `route tune` measured on its dev set (for the record)

    @model_validator(mode="after")
    def _check(self) -> "RouterConfig":
        if len(self.tiers) < 2:
            raise ValueError("a cascade needs at least two tiers")
        if len({t.name for t in self.tiers}) != len(self.tiers):
            raise ValueError("tier names must be unique")
        if self.signal == "learned" and not self.learned:
            raise ValueError("signal `learned` needs a `learned:` router (run `slimlm route tune --signal learned`)")
        return self

    def thresholds(self) -> list[float]:
        """The thresholds of every tier but the last; an untuned router is refused."""
        missing = [t.name for t in self.tiers[:-1] if t.threshold is None]
        if missing:
            raise SlimlmError(f"router {self.name!r}: tier {missing[0]!r} has no threshold",
                              "run `slimlm route tune` on a labelled dev set, or set `threshold:` by hand")
        return [float(t.threshold) for t in self.tiers[:-1]]  # type: ignore[arg-type]


def load_router(path: str | Path) -> RouterConfig:
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"router file {p} not found", "write one (see docs/serving.md) or run `slimlm route tune`")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        return RouterConfig(**(raw or {}))
    except yaml.YAMLError as exc:
        raise SlimlmError(f"{p}: invalid YAML ({getattr(exc, 'problem', exc)})", "fix the router file's syntax") from None
    except TypeError:
        raise SlimlmError(f"{p}: a router file must be a YAML mapping", "see docs/serving.md") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise SlimlmError(f"{p}: {where + ': ' if where else ''}{err['msg']}", "see docs/serving.md for the router format") from None


def save_router(cfg: RouterConfig, path: str | Path) -> Path:
    """Write atomically (temp sibling, then rename) so a failed tune never leaves half a file."""
    p = Path(path)
    data = cfg.model_dump(exclude_none=True)
    for t in data["tiers"]:  # YAML has no portable infinity: clamp "never/always escalate" cut points
        if "threshold" in t and not math.isfinite(t["threshold"]):
            t["threshold"] = 1e9 if t["threshold"] > 0 else -1e9
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, p)
    return p
