"""Sampling: one distribution-shaping path (penalty → temperature → top-k → top-p → min-p) and a draw.

:func:`processed_probs` returns exactly the distribution :func:`sample` draws from, so speculative
sampling can compare a target's and a draft's processed distributions (Leviathan et al. 2023).
Greedy (``temperature == 0``) is the arg-max of the penalised logits; its "distribution" is one-hot.
Top-p follows Holtzman et al. 2020 (smallest prefix of the sorted tokens whose mass reaches p; the
top token always stays); min-p keeps tokens with ``p ≥ min_p · p_max`` (Nguyen et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimlm.errors import SlimlmError


@dataclass
class GenConfig:
    """What to generate and how to pick each token; the CLI flags and ``slimlm.generate`` kwargs map 1:1."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output text)
    stop_at_eos: bool = True

    def validate(self) -> None:
        """Raise :class:`SlimlmError` naming the first out-of-range option."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer ≥ 1"),
            (self.temperature >= 0, "temperature", self.temperature, "≥ 0 (0 = greedy)"),
            (self.top_k >= 0, "top_k", self.top_k, "an integer ≥ 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]"),
            (0 <= self.min_p < 1, "min_p", self.min_p, "in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0 (1 = off)"),
        ]
        for ok, name, value, want in checks:
            if not ok:
                raise SlimlmError(f"sampling option {name}={value} is out of range", f"use {want}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SlimlmError(f"stop strings must be non-empty strings, got {self.stop!r}", "drop the empty stop string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: torch.Tensor, penalty: float, history: torch.Tensor | None) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): seen tokens' logits ÷ penalty if > 0, × if < 0."""
    if penalty == 1.0 or history is None or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    logits = logits.clone()
    logits.scatter_(1, history, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def processed_probs(logits: torch.Tensor, cfg: GenConfig, history: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) probabilities that :func:`sample` draws from (one-hot at the arg-max when greedy)."""
    logits = penalize(logits.float(), cfg.repetition_penalty, history)
    if cfg.greedy:
        return torch.zeros_like(logits).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p  # mass before this token already ≥ p
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted), 0.0)
    if cfg.min_p > 0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, cfg: GenConfig, generator: torch.Generator | None = None,
           history: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) next tokens from (B, V) fp32 logits; greedy skips the softmax altogether."""
    if cfg.greedy:
        return penalize(logits.float(), cfg.repetition_penalty, history).argmax(-1)
    probs = processed_probs(logits, cfg, history)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
