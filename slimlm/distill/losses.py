"""Distillation losses: pure functions of student/teacher logits, a temperature and a token mask.

With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` over the vocabulary, per token:

- ``fkl``  forward KL ``KL(p‖q)`` (Hinton et al. 2015): mode-covering.
- ``rkl``  reverse KL ``KL(q‖p)`` (MiniLLM, Gu et al. 2024): mode-seeking.
- ``skl``  skew KL ``KL(p ‖ αp + (1−α)q)`` and ``srkl`` skew reverse KL ``KL(q ‖ (1−α)p + αq)``
  (DistiLLM, Ko et al. 2024): mixing a little of the other distribution in bounds the gradient.
- ``jsd``  generalized JSD ``β·KL(p‖m) + (1−β)·KL(q‖m)``, ``m = βp + (1−β)q`` (GKD, Agarwal et al.
  2024); symmetric at β = 0.5.
- ``tvd``  total variation ``½·Σ|p − q|``.

Every divergence is multiplied by ``T²`` so gradient magnitudes do not shrink with the temperature,
and averaged over the tokens where ``mask`` is true. Mixtures are formed in log space with
``logsumexp`` so extreme logits give finite values and gradients.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError

Divergence = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Per-token KL(a‖b) from log-probabilities (..., V) → (...)."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a·a + (1−w_a)·b), computed stably; w_a ∈ [0, 1]."""
    la = math.log(w_a) if w_a > 0 else -math.inf
    lb = math.log1p(-w_a) if w_a < 1 else -math.inf
    return torch.logaddexp(logp_a + la, logp_b + lb)


def fkl(logp_t: torch.Tensor, logp_s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl(logp_t, logp_s)


def rkl(logp_t: torch.Tensor, logp_s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl(logp_s, logp_t)


def skl(logp_t: torch.Tensor, logp_s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl(logp_t, _log_mix(logp_t, logp_s, alpha))


def srkl(logp_t: torch.Tensor, logp_s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl(logp_s, _log_mix(logp_t, logp_s, 1.0 - alpha))


def jsd(logp_t: torch.Tensor, logp_s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    log_m = _log_mix(logp_t, logp_s, beta)
    return beta * _kl(logp_t, log_m) + (1.0 - beta) * _kl(logp_s, log_m)


def tvd(logp_t: torch.Tensor, logp_s: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return 0.5 * (logp_t.exp() - logp_s.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Divergence] = {"fkl": fkl, "rkl": rkl, "skl": skl, "srkl": srkl, "jsd": jsd, "tvd": tvd}
LOSS_NAMES = (*DIVERGENCES, "lm")


def check_loss(name: str, alpha: float = 0.1, beta: float = 0.5, temperature: float = 1.0) -> None:
    """Fail early, with the fix, on an unknown loss name or an out-of-range parameter."""
    if name not in LOSS_NAMES:
        raise SlimlmError(f"unknown distillation loss {name!r}", f"use one of {', '.join(LOSS_NAMES)}")
    if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta <= 1.0:
        raise SlimlmError(f"alpha={alpha} / beta={beta} out of range", "alpha (skew) and beta (JSD) must lie in [0, 1]")
    if temperature <= 0:
        raise SlimlmError(f"temperature={temperature} must be positive", "use e.g. 1.0 or 2.0")


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T) values over positions where ``mask`` (B, T) is true (all when None)."""
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def divergence(name: str, student_logits: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor | None = None,
               *, temperature: float = 1.0, alpha: float = 0.1, beta: float = 0.5) -> torch.Tensor:
    """Masked mean of divergence ``name`` between teacher and student, × T².

    ``student_logits`` (B, T, V); ``teacher_logp`` (B, T, V) are the teacher's *log-probabilities at
    temperature T* (see :func:`teacher_log_probs`), so a cached sparse teacher plugs in the same way.
    """
    check_loss(name, alpha, beta, temperature)
    logp_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    per_token = DIVERGENCES[name](teacher_logp.float(), logp_s, alpha, beta)  # (B, T)
    return masked_mean(per_token, mask) * temperature**2


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(teacher_logits.float() / temperature, dim=-1)


def lm_loss(student_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) at position t predict ids[:, t+1] where mask[:, t+1]."""
    nll = F.cross_entropy(student_logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    return masked_mean(nll, None if mask is None else mask[:, 1:])


def hidden_mse(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], layer_map: list[tuple[int, int]],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over (student layer, teacher layer) pairs of the masked per-token MSE of hidden states (B, T, d)."""
    terms = [masked_mean((student_hidden[s].float() - teacher_hidden[t].float()).pow(2).mean(-1), mask) for s, t in layer_map]
    return torch.stack(terms).mean()


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student block j's output ↔ teacher block ⌈(j+1)·n_t/n_s⌉'s output (hidden_states indices, 0 = embeddings)."""
    return [(j + 1, math.ceil((j + 1) * n_teacher / n_student)) for j in range(n_student)]
