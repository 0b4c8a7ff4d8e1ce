"""Pieces shared by the decoding strategies built on the engine (speculative, contrastive): the token
budget, seeded generators, per-row penalty histories, the engine's own token choice, and an emitter that
applies EOS / stop strings / the budget exactly as the engine's decode loop does (same stop-string cut,
same held-back streaming deltas), for strategies that emit several tokens per step.
"""

from __future__ import annotations

from typing import Callable

import torch

from slimlm.runtime.decode import cut_stop, safe_end, check_prompts
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig, sample


def prompt_ids(engine: Engine, prompt: str | list[int], cfg: GenConfig, *, chat: bool = False) -> tuple[list[int], int]:
    """Token ids of ``prompt`` (checked against the context, as the engine does) and the token budget."""
    ids = engine.encode(prompt, chat=chat)
    check_prompts(engine, [ids])
    return ids, min(cfg.max_new_tokens, engine.max_seq - len(ids))


def new_generator(cfg: GenConfig) -> torch.Generator | None:
    return torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None


def row_histories(ctx: list[int], extras: list[list[int]], cfg: GenConfig) -> torch.Tensor | None:
    """(rows, T) seen-token history ``ctx + extras[r]`` per row for the repetition penalty, or None when it is off.

    The penalty depends only on *which* tokens were seen, so short rows are padded with a token already in them.
    """
    if cfg.repetition_penalty == 1.0:
        return None
    width = len(ctx) + max(len(e) for e in extras)
    return torch.tensor([ctx + e + [ctx[-1]] * (width - len(ctx) - len(e)) for e in extras], dtype=torch.long)


def pick(logits: torch.Tensor, cfg: GenConfig, gen: torch.Generator | None, history: torch.Tensor | None) -> list[int]:
    """The engine's own choice for each row of (rows, V) logits (greedy: arg-max of the penalised logits)."""
    return sample(logits.float(), cfg, gen, history).tolist()


class Emitter:
    """Collects generated tokens; stops at EOS, a stop string (cut from the text) or the token budget."""

    def __init__(self, engine: Engine, cfg: GenConfig, budget: int, on_token: Callable[[int, str], None] | None = None) -> None:
        self.tokenizer, self.stops, self.budget, self.on_token = engine.tokenizer, cfg.stop, budget, on_token
        self.eos = engine.eos_ids() if cfg.stop_at_eos else set()
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.reason = ""
        self._emitted = 0  # characters of ``text`` already streamed

    @property
    def finished(self) -> bool:
        return bool(self.reason)

    @property
    def room(self) -> int:
        return self.budget - len(self.tokens)

    def push(self, new: list[int], logprobs: torch.Tensor) -> None:
        """Append tokens in order until one of them ends the generation."""
        for tok, lp in zip(new, logprobs.tolist()):
            if self.finished:
                return
            if tok in self.eos:
                self.reason = "eos"
                self._send(tok, len(self.text))
                return
            self.tokens.append(tok)
            self.logprobs.append(lp)
            self.text, hit = cut_stop(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stops)
            if hit or len(self.tokens) >= self.budget:
                self.reason = "stop" if hit else "length"
            self._send(tok, len(self.text) if self.finished else safe_end(self.text, self.stops))

    def _send(self, tok: int, end: int) -> None:
        delta, self._emitted = self.text[self._emitted:end], max(self._emitted, end)
        if self.on_token is not None:
            self.on_token(tok, delta)
