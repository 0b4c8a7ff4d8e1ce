"""The cascade policy: answer with the cheapest tier that is confident enough, keep private data local.

For each tier in order: answer, score the answer with the router's signal, stop when the confidence
reaches the tier's threshold (the last tier always answers). Before a remote tier sees a request, the
privacy rule applies: ``local`` stops the cascade at the last local answer, ``mask`` replaces every
private span with a placeholder and restores the values in the remote answer. Each decision is
appended to a local JSONL log holding tiers, confidences and the *kinds* of private spans — never
prompt text or private values.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from slimlm.errors import SlimlmError
from slimlm.route import pii
from slimlm.route.config import RouterConfig
from slimlm.route.learned import LogisticRouter
from slimlm.route.signals import SIGNALS, Evidence
from slimlm.route.tiers import Need, Query, TierAnswer


class Tier(Protocol):
    name: str
    remote: bool

    def answer(self, query: Query, need: Need) -> TierAnswer: ...


def make_scorer(cfg: RouterConfig) -> tuple[Callable[[Evidence], float], Need]:
    """The router's confidence function and the evidence it needs."""
    if cfg.signal == "learned":
        router = LogisticRouter.from_dict(cfg.learned or {})
        names, score = router.names, router.predict
    else:
        fn = SIGNALS.get(cfg.signal)
        names, score = [cfg.signal], fn
    need = Need(entropies="neg_entropy" in names, samples=cfg.samples if "agreement" in names else 0,
                temperature=cfg.sample_temperature)
    return score, need


@dataclass
class Decision:
    """One routed request, as logged: no text, no private values."""

    id: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    answered_by: str = ""
    pii_kinds: dict[str, int] = field(default_factory=dict)
    privacy_action: str = "none"  # none | masked | kept_local
    seconds: float = 0.0


class Cascade:
    def __init__(self, cfg: RouterConfig, tiers: list[Tier], *, log_path: str | Path | None = None,
                 on_decision: Callable[[Decision], None] | None = None) -> None:
        self.cfg = cfg
        self.tiers = tiers
        self.thresholds = cfg.thresholds()
        self.score, self.need = make_scorer(cfg)
        self.log_path = Path(log_path) if log_path else (Path(cfg.log) if cfg.log else None)
        self.on_decision = on_decision
        self._log_lock = threading.Lock()

    def answer(self, query: Query) -> tuple[TierAnswer, Decision]:
        t0 = time.perf_counter()
        dec = Decision(id=uuid.uuid4().hex[:12])
        spans = []
        if self.cfg.privacy.mode != "off":
            spans = [pii.find_pii(t, self.cfg.privacy.kinds) for t in query.texts()]
            dec.pii_kinds = pii.kind_counts([s for ss in spans for s in ss])
        best: TierAnswer | None = None
        for i, tier in enumerate(self.tiers):
            last = i == len(self.tiers) - 1
            if tier.remote and dec.pii_kinds and self.cfg.privacy.mode == "local":
                dec.privacy_action = "kept_local"
                dec.steps.append({"tier": tier.name, "skipped": "private"})
                continue
            need = Need() if last else self.need
            if tier.remote and dec.pii_kinds:
                masked = [pii.mask(t, s) for t, s in zip(query.texts(), spans)]
                table = {k: v for _, tab in masked for k, v in tab.items()}
                ans = tier.answer(query.with_texts([m for m, _ in masked]), need)
                ans.text = pii.restore(ans.text, table)
                dec.privacy_action = "masked"
            else:
                ans = tier.answer(query, need)
            best = ans
            if last:
                dec.steps.append({"tier": tier.name})
                break
            conf = self.score(ans.evidence)
            stop = conf >= self.thresholds[i]
            dec.steps.append({"tier": tier.name, "confidence": conf if math.isfinite(conf) else None,
                              "threshold": self.thresholds[i], "escalate": not stop})
            if stop:
                break
        if best is None:
            raise SlimlmError(f"router {self.cfg.name!r}: the request holds private data and every tier is remote",
                              "add a local tier, or set `privacy: {mode: mask}`")
        dec.answered_by = next(s["tier"] for s in reversed(dec.steps) if "skipped" not in s)
        dec.seconds = time.perf_counter() - t0
        self._log(dec)
        return best, dec

    def _log(self, dec: Decision) -> None:
        if self.on_decision:
            self.on_decision(dec)
        if self.log_path is None:
            return
        line = json.dumps({"ts": time.time(), **asdict(dec)})
        with self._log_lock:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
