"""The decode loop: chunked prefill, one engine forward per step, sampling, EOS/stop strings, streaming.

Rows of a batch are prefilled together (right-padded; each row's length is then rolled back to its
own), decoded in lock-step, and finish independently. Stop strings are matched on the decoded text;
a streamed delta is held back while the text ends in a possible stop-string prefix or an incomplete
UTF-8 sequence, so the joined stream equals the final text exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from slimlm.devices import timer
from slimlm.errors import SlimlmError
from slimlm.runtime.sampling import GenConfig, sample


Event = tuple[int, int, str]  # (row, token id, text delta)
PREFILL_CHUNK = 256  # tokens per prefill forward


@dataclass
class GenResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "eos"
    logprobs: list[float]  # log-softmax of the model's logits at each generated token
    ttft_s: float
    decode_tok_s: float


@dataclass
class _Row:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    finish: str | None = None


def cut_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def safe_end(text: str, stops: list[str]) -> int:
    """How much of ``text`` can be streamed now: not an incomplete character, not a possible stop prefix."""
    end = len(text.rstrip("\ufffd"))
    for s in stops:
        for n in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:n]):
                end -= n
                break
    return max(end, 0)


def check_prompts(engine: Any, prompts: list[list[int]]) -> None:
    for p in prompts:
        if not p:
            raise SlimlmError("empty prompt", "pass at least one token of text")
        if len(p) >= engine.max_seq:
            raise SlimlmError(f"the prompt has {len(p)} tokens, the context holds {engine.max_seq}",
                              f"shorten the prompt (or raise max_seq, up to the model's {engine.context_limit})")


def prefill(engine: Any, prompts: list[list[int]], chunk: int = 0) -> torch.Tensor:
    """Reset the cache for these rows, run the prompts in chunks; (B, V) logits at each row's last token."""

    chunk = chunk or PREFILL_CHUNK
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    engine.reset(bsz)
    ids = torch.tensor([p + [p[-1]] * (longest - len(p)) for p in prompts], dtype=torch.long)
    last = torch.tensor([len(p) - 1 for p in prompts])
    out = torch.empty(bsz, engine.vocab_size)
    for c0 in range(0, longest, chunk):
        c1 = min(c0 + chunk, longest)
        logits = engine.forward(ids[:, c0:c1], at=(last - c0).clamp(0, c1 - c0 - 1))[:, 0]
        here = (last >= c0) & (last < c1)
        out[here] = logits[here].to(out.device)
    engine.truncate(last + 1)
    return out


def iter_generation(engine: Any, prompts: list[list[int]], cfg: GenConfig,
                    results: list[GenResult] | None = None) -> Iterator[Event]:
    """Yield (row, token, delta) per generated token; fill ``results`` (if given) at the end."""

    cfg.validate()
    check_prompts(engine, prompts)
    tok = engine.tokenizer
    eos = engine.eos_ids() if cfg.stop_at_eos else set()
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    rows = [_Row(list(p)) for p in prompts]
    t0 = timer(engine.device)  # timers wait for the device's queued kernels (CUDA runs asynchronously)
    logits = prefill(engine, prompts)
    ttft = timer(engine.device) - t0
    budget = min(cfg.max_new_tokens, engine.max_seq - max(len(p) for p in prompts))
    t_decode, steps = timer(engine.device), 0
    for step in range(budget):
        history = _history(rows) if cfg.repetition_penalty != 1.0 else None
        nxt = sample(logits, cfg, gen, history)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None])[:, 0]
        for r, row in enumerate(rows):
            if row.finish:
                continue
            t = int(nxt[r])
            if t in eos:
                row.finish = "eos"
                yield from _flush(r, row, t)
                continue
            row.tokens.append(t)
            row.logprobs.append(float(logp[r]))
            full = tok.decode(row.tokens, skip_special_tokens=True)
            row.text, hit = cut_stop(full, cfg.stop)
            if hit:
                row.finish = "stop"
                yield from _flush(r, row, t)
                continue
            end = safe_end(row.text, cfg.stop)
            delta, row.emitted = row.text[row.emitted:end], max(row.emitted, end)
            yield r, t, delta
        if all(row.finish for row in rows) or step == budget - 1:
            break
        logits = engine.forward(nxt[:, None])[:, -1]
        steps += 1
    elapsed = timer(engine.device) - t_decode
    for r, row in enumerate(rows):
        if not row.finish:
            row.finish = "length"
            yield from _flush(r, row, None)
    if results is not None:
        rate = steps / elapsed if elapsed > 0 and steps else 0.0
        results.extend(GenResult(row.text, row.tokens, len(row.prompt), row.finish or "length", row.logprobs, ttft, rate)
                       for row in rows)


def _flush(r: int, row: _Row, token: int | None) -> Iterator[Event]:
    """The final, held-back part of a finished row's text."""
    delta, row.emitted = row.text[row.emitted:], len(row.text)
    if delta or token is not None:
        yield r, -1 if token is None else token, delta


def _history(rows: list[_Row]) -> torch.Tensor:
    """(B, T) prompt + generated ids for the repetition penalty; short rows repeat their last id."""
    seqs = [row.prompt + row.tokens for row in rows]
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], dtype=torch.long)


def run_generation(engine: Any, prompts: list[list[int]], cfg: GenConfig,
                   on_token: Callable[[int, str], None] | None = None) -> list[GenResult]:
    """Run to completion; ``on_token(token, delta)`` sees every event of a single-prompt call."""
    results: list[GenResult] = []
    for _row, token, delta in iter_generation(engine, prompts, cfg, results):
        if on_token is not None and len(prompts) == 1:
            on_token(token, delta)
    return results
