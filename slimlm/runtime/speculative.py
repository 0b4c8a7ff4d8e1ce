"""Speculative decoding: a cheap draft proposes k tokens, the target checks all of them in one forward.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et al.
2023 ("Accelerating Large Language Model Decoding with Speculative Sampling"): draft token ``d_i`` drawn
from the draft's distribution ``q_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))`` where
``p_i`` is the target's; at the first rejection the token is redrawn from ``norm(max(0, p_i − q_i))``,
and when all k are kept a bonus token comes from ``p_{k+1}``. Every emitted token is then exactly
distributed as the target alone would sample it. ``p`` and ``q`` are the engine's *processed*
distributions (temperature, top-k, top-p, min-p, repetition penalty), so those options keep their
meaning. Greedy decoding keeps the longest draft prefix that matches the target's own argmax, so its
text equals the target's (up to float ties between a 1-token and a (k+1)-token forward).

Drafts (``Draft.propose``): another model with the same tokenizer (its own engine and cache),
the target's own first blocks (``Engine.forward(n_blocks=…)``: self-speculation, the cache of those
blocks is the target's), or prompt lookup (Saxena 2023: the tokens that followed the latest earlier
occurrence of the current n-gram in prompt + output; free, deterministic, so ``q`` is one-hot).
k adapts: it grows after a fully accepted block and shrinks after an early rejection.
Batch size 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from slimlm.errors import SlimlmError
from slimlm.runtime.decode import prefill
from slimlm.runtime.emit import Emitter, new_generator, pick, prompt_ids, row_histories
from slimlm.runtime.engine import Engine, GenResult
from slimlm.runtime.sampling import GenConfig, processed_probs
from slimlm.runtime.vocab import check_same_vocab


@dataclass
class SpecConfig:
    """How many tokens the draft proposes per target forward, and how that number adapts."""

    k: int = 4
    k_min: int = 1
    k_max: int = 8
    adaptive: bool = True

    def validate(self) -> None:
        if not 1 <= self.k_min <= self.k <= self.k_max:
            raise SlimlmError(f"speculative k={self.k} must satisfy 1 ≤ k_min={self.k_min} ≤ k ≤ k_max={self.k_max}",
                              "e.g. --k 4 (k_min 1, k_max 8)")


@dataclass
class SpecResult(GenResult):
    """A generation plus what the draft did: ``accepted / proposed`` is the acceptance rate."""

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft: str = ""

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Draft(Protocol):
    """Proposes up to ``k`` tokens after ``ctx`` (prompt + output; the target's cache holds ``ctx[:-1]``).

    Returns the tokens and, for sampled drafts, the distributions they were drawn from, (n, V);
    ``None`` means deterministic (one-hot q), as for prompt lookup and for greedy decoding.
    """

    name: str

    def propose(self, target: Engine, ctx: list[int], k: int, cfg: GenConfig,
                gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]: ...


# ---------------------------------------------------------------------------------------------
# pure rules
# ---------------------------------------------------------------------------------------------

def accept_greedy(target_choice: list[int], drafts: list[int]) -> tuple[int, int]:
    """Greedy verification: (drafts kept, next token). ``target_choice[i]`` is the target's pick at block position i."""
    n = 0
    while n < len(drafts) and drafts[n] == target_choice[n]:
        n += 1
    return n, target_choice[n]


def accept_sampled(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                   gen: torch.Generator | None) -> tuple[int, int]:
    """The exact speculative-sampling rule: (drafts kept, next token).

    p: (k+1, V) target distributions at the k+1 block positions; q: (k, V) draft distributions, or
    None for a deterministic draft (q one-hot at the draft token).
    """
    k = len(drafts)
    p, q = p.cpu(), (q.cpu() if q is not None else None)  # the engine's generators live on the CPU
    if k:
        d = torch.tensor(drafts)
        pd = p[:k].gather(1, d[:, None])[:, 0]
        qd = q.gather(1, d[:, None])[:, 0] if q is not None else torch.ones_like(pd)
        r = torch.rand(k, generator=gen)
        rejected = (r * qd >= pd).nonzero()  # keep d_i with probability min(1, p/q)
        if len(rejected):
            i = int(rejected[0, 0])
            if q is not None:
                resid = (p[i] - q[i]).clamp_min(0)
            else:
                resid = p[i].clone()
                resid[drafts[i]] = 0
            if float(resid.sum()) <= 0:  # p == q up to rounding: any draw from p is exact
                resid = p[i]
            return i, int(torch.multinomial(resid / resid.sum(), 1, generator=gen))
    return k, int(torch.multinomial(p[k], 1, generator=gen))


def lookup_ngram(tokens: list[int], k: int, ngram_max: int = 3, ngram_min: int = 1) -> list[int]:
    """Prompt-lookup draft: the ≤ k tokens after the latest earlier occurrence of the longest matching suffix n-gram."""
    n_tok = len(tokens)
    for n in range(min(ngram_max, n_tok - 1), ngram_min - 1, -1):
        pattern = tokens[n_tok - n:]
        for start in range(n_tok - n - 1, -1, -1):
            if tokens[start:start + n] == pattern:
                return tokens[start + n:start + n + k]
    return []


def next_k(k: int, kept: int, proposed: int, spec: SpecConfig) -> int:
    """Grow k after a full accept of a full-size block; shrink it when less than half the block survived."""
    if not spec.adaptive or proposed == 0:
        return k
    if kept == proposed and proposed >= k:
        return min(k + 1, spec.k_max)
    if kept < proposed / 2:
        return max(k - 1, spec.k_min)
    return k


# ---------------------------------------------------------------------------------------------
# drafts
# ---------------------------------------------------------------------------------------------

def _draw(logits: torch.Tensor, cfg: GenConfig, gen: torch.Generator | None,
          history: list[int]) -> tuple[int, torch.Tensor | None]:
    """One draft token from (1, V) logits: greedy → the engine's pick (q unused); sampled → from q, returned."""
    hist = row_histories(history, [[]], cfg)
    if cfg.temperature == 0:
        return pick(logits, cfg, None, hist)[0], None
    q = processed_probs(logits, cfg, hist).cpu()  # (1, V); the engine's generators live on the CPU
    return int(torch.multinomial(q[0], 1, generator=gen)), q[0]


def _stack(qs: list[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.stack(qs) if qs and qs[0] is not None else None  # type: ignore[arg-type]


@dataclass
class LookupDraft:
    """Prompt-lookup (n-gram) drafting: copies what followed the current n-gram earlier in the context."""

    ngram_max: int = 3
    ngram_min: int = 1
    name: str = "lookup"

    def propose(self, target: Engine, ctx: list[int], k: int, cfg: GenConfig,
                gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        return lookup_ngram(ctx, k, self.ngram_max, self.ngram_min), None


@dataclass
class SelfDraft:
    """Self-speculation: the target's first ``n_blocks`` blocks + final norm + head as the draft."""

    n_blocks: int
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"self:{self.n_blocks}"

    def propose(self, target: Engine, ctx: list[int], k: int, cfg: GenConfig,
                gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        tok = ctx[-1]
        dev = target.device
        for _ in range(k):
            logits = target.forward(torch.tensor([[tok]], device=dev), n_blocks=self.n_blocks)[:, -1]
            tok, q = _draw(logits, cfg, gen, ctx + drafts)
            drafts.append(tok)
            qs.append(q)
        return drafts, _stack(qs)  # the caller truncates the target back to len(ctx) - 1


class ModelDraft:
    """A separate draft model (same tokenizer) with its own engine; its cache follows the accepted text."""

    def __init__(self, engine: Engine, name: str = "model") -> None:
        self.engine = engine
        self.name = name
        self._cached: list[int] | None = None  # tokens in the draft's cache

    def propose(self, target: Engine, ctx: list[int], k: int, cfg: GenConfig,
                gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        e = self.engine
        keep = 0
        if self._cached is not None:
            while keep < min(len(self._cached), len(ctx) - 1) and self._cached[keep] == ctx[keep]:
                keep += 1
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        if keep == 0:
            logits = prefill(e, [ctx])  # a new prompt: the engine's chunked prefill
        else:
            e.truncate(keep)
            logits = e.forward(torch.tensor([ctx[keep:]], device=e.device))[:, -1]
        for i in range(k):
            if i:
                logits = e.forward(torch.tensor([[drafts[-1]]], device=e.device))[:, -1]
            tok, q = _draw(logits.float(), cfg, gen, ctx + drafts)
            drafts.append(tok)
            qs.append(q)
        self._cached = ctx + drafts[:-1]
        return drafts, _stack(qs)


def make_draft(spec: str, target: Engine, **engine_kw: Any) -> Draft:
    """``lookup`` | ``lookup:N`` (longest n-gram N) | ``self:N`` (first N blocks) | a model source with the target's tokenizer."""
    kind, _, arg = spec.partition(":")
    if kind in ("lookup", "self") and arg and not arg.isdigit():
        raise SlimlmError(f"draft {spec!r}: {arg!r} is not a number", f"use {kind}:N, e.g. {kind}:{3 if kind == 'lookup' else 6}")
    if kind == "lookup":
        return LookupDraft(ngram_max=int(arg or 3))
    if kind == "self":
        n_layers = target.n_layers
        if not arg or not 1 <= int(arg) < n_layers:
            raise SlimlmError(f"draft {spec!r} needs a block count in 1..{n_layers - 1}", f"e.g. self:{n_layers // 4}")
        return SelfDraft(int(arg))
    from slimlm.models import load

    lm = load(spec)
    check_same_vocab(target.tokenizer, lm.tokenizer, target.lm.info.source, spec)
    return ModelDraft(Engine(lm, **{"max_seq": target.max_seq, **engine_kw}), name=spec)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

def speculative_generate(target: Engine, draft: Draft, prompt: str | list[int], cfg: GenConfig | None = None,
                         spec: SpecConfig | None = None, *, chat: bool = False,
                         on_token: Callable[[int, str], None] | None = None) -> SpecResult:
    """Generate with ``draft`` proposing and ``target`` verifying; same options and result fields as ``Engine.generate``."""
    cfg = cfg or GenConfig()
    spec = spec or SpecConfig()
    cfg.validate()
    spec.validate()
    if isinstance(draft, ModelDraft):
        check_same_vocab(target.tokenizer, draft.engine.tokenizer, target.lm.info.source, draft.engine.lm.info.source)
    ids, budget = prompt_ids(target, prompt, cfg, chat=chat)
    gen = new_generator(cfg)
    dev = target.device
    t0 = time.perf_counter()
    logits = prefill(target, [ids])  # (1, V), the engine's own chunked prefill
    first = pick(logits, cfg, gen, row_histories(ids, [[]], cfg))[0]
    ttft = time.perf_counter() - t0
    out = Emitter(target, cfg, budget, on_token)
    out.push([first], torch.log_softmax(logits.float(), -1)[:, first])
    ctx = ids + [first]
    k, proposed, accepted, forwards = spec.k, 0, 0, 1
    while not out.finished:
        base = len(ctx) - 1  # tokens in the target's cache
        room = min(k, out.room - 1)  # the step always emits one token of its own after the drafts
        drafts, q = draft.propose(target, ctx, room, cfg, gen) if room > 0 else ([], None)
        target.truncate(base)  # a self-draft ran its blocks ahead; the others leave the cache at base
        block = [ctx[-1]] + drafts
        logits = target.forward(torch.tensor([block], device=dev))[0].float()  # (len(block), V)
        forwards += 1
        hist = row_histories(ctx, [drafts[:i] for i in range(len(block))], cfg)
        if cfg.temperature == 0:
            kept, nxt = accept_greedy(pick(logits, cfg, None, hist), drafts)
        else:
            kept, nxt = accept_sampled(processed_probs(logits, cfg, hist), q, drafts, gen)
        target.truncate(base + 1 + kept)
        new = drafts[:kept] + [nxt]
        logp = torch.log_softmax(logits[:kept + 1], -1).gather(1, torch.tensor(new, device=logits.device)[:, None])[:, 0]
        out.push(new, logp)
        proposed += len(drafts)
        accepted += kept
        k = next_k(k, kept, len(drafts), spec)
        ctx += new
    dt = time.perf_counter() - t0 - ttft
    n = len(out.tokens)
    return SpecResult(text=out.text, tokens=out.tokens, prompt_tokens=len(ids), finish_reason=out.reason,
                      logprobs=out.logprobs, ttft_s=ttft, decode_tok_s=(n - 1) / dt if n > 1 and dt > 0 else 0.0,
                      proposed=proposed, accepted=accepted, target_forwards=forwards, draft=draft.name)
