"""Decoding from a combination of several models' logits: contrastive decoding and proxy-tuning.

Contrastive decoding (Li et al. 2023, "Contrastive Decoding: Open-ended Text Generation as
Optimization"): score ``log p_expert(x) − β · log p_amateur(x)`` over the plausible tokens
``V_head = {x : p_expert(x) ≥ α · max p_expert}``; everything else is −∞. The amateur's mistakes
are what a small model also makes, so subtracting them favours what only the expert knows. β = 0
is the expert alone.

Proxy-tuning (Liu et al. 2024, "Tuning Language Models by Proxy"): steer a large base model with
the logit difference a small model gained from tuning, ``base_large + (tuned_small − base_small)``.

Both run as one lock-step loop over several engines (one forward per model per token), then pick
the next token from the combined scores with the ordinary sampling options (greedy, temperature,
top-k/p, min-p, penalty). All models must share the tokenizer.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from slimlm.errors import SlimlmError
from slimlm.runtime.decode import prefill
from slimlm.runtime.emit import Emitter, new_generator, pick, prompt_ids, row_histories
from slimlm.runtime.engine import Engine, GenResult
from slimlm.runtime.sampling import GenConfig
from slimlm.runtime.vocab import check_same_vocab

Combine = Callable[[list[torch.Tensor]], torch.Tensor]  # per-model (B, V) logits → (B, V) scores


def contrastive_logits(expert: torch.Tensor, amateur: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """(B, V) contrastive scores: expert log-prob − β·amateur log-prob on V_head, −∞ elsewhere."""
    lp_e = torch.log_softmax(expert.float(), -1)
    lp_a = torch.log_softmax(amateur.float(), -1)
    implausible = lp_e < lp_e.amax(-1, keepdim=True) + math.log(alpha)  # p_e < α · max p_e
    return (lp_e - beta * lp_a).masked_fill(implausible, float("-inf"))


def proxy_logits(base: torch.Tensor, tuned_small: torch.Tensor, base_small: torch.Tensor) -> torch.Tensor:
    """(B, V) proxy-tuned logits: the large base plus the small model's tuning offset."""
    return base.float() + (tuned_small.float() - base_small.float())


def check_contrastive(beta: float, alpha: float) -> None:
    if beta < 0:
        raise SlimlmError(f"contrastive beta={beta} is negative", "use beta ≥ 0 (0 = the expert alone; Li et al. use 0.5–1)")
    if not 0 < alpha <= 1:
        raise SlimlmError(f"contrastive alpha={alpha} is outside (0, 1]", "use e.g. alpha 0.1 (keep tokens with p ≥ 0.1·max p)")


def guided_generate(engines: Sequence[Engine], combine: Combine, prompt: str | list[int], cfg: GenConfig | None = None,
                    *, chat: bool = False, on_token: Callable[[int, str], None] | None = None) -> GenResult:
    """Generate from ``combine([logits of each engine])``; ``engines[0]`` owns the tokenizer and the prompt encoding.

    ``logprobs`` are log-softmax of the combined scores at each chosen token.
    """
    cfg = cfg or GenConfig()
    cfg.validate()
    lead = engines[0]
    for e in engines[1:]:
        check_same_vocab(lead.tokenizer, e.tokenizer, lead.lm.info.source, e.lm.info.source)
    ids, budget = prompt_ids(lead, prompt, cfg, chat=chat)
    budget = min([budget] + [e.max_seq - len(ids) for e in engines[1:]])
    width = min(e.vocab_size for e in engines)  # same tokenizer; heads may be padded differently
    gen = new_generator(cfg)
    out = Emitter(lead, cfg, budget, on_token)
    t0 = time.perf_counter()
    distinct = list({id(e): e for e in engines}.values())  # one engine passed twice is run (and cached) once
    slot = [next(i for i, d in enumerate(distinct) if d is e) for e in engines]

    def step(feed: list[int] | None) -> list[torch.Tensor]:
        rows = [(prefill(e, [ids]) if feed is None else e.forward(torch.tensor([feed], device=e.device))[:, -1])[:, :width]
                for e in distinct]
        return [rows[i].to(lead.device) for i in slot]

    logits = step(None)
    ttft = 0.0
    ctx = list(ids)
    while True:
        scores = combine(logits)  # (1, V)
        tok = pick(scores, cfg, gen, row_histories(ctx, [[]], cfg))[0]
        out.push([tok], torch.log_softmax(scores.float(), -1)[:, tok])
        ttft = ttft or time.perf_counter() - t0
        if out.finished:
            break
        ctx.append(tok)
        logits = step([tok])
    n = len(out.tokens)
    dt = time.perf_counter() - t0 - ttft
    return GenResult(text=out.text, tokens=out.tokens, prompt_tokens=len(ids), finish_reason=out.reason, logprobs=out.logprobs,
                     ttft_s=ttft, decode_tok_s=(n - 1) / dt if n > 1 and dt > 0 else 0.0)


def contrastive_generate(expert: Engine, amateur: Engine, prompt: str | list[int], cfg: GenConfig | None = None, *,
                         beta: float = 0.5, alpha: float = 0.1, chat: bool = False,
                         on_token: Callable[[int, str], None] | None = None) -> GenResult:
    """Contrastive decoding of ``prompt`` by an expert/amateur pair."""
    check_contrastive(beta, alpha)
    return guided_generate([expert, amateur], lambda lg: contrastive_logits(lg[0], lg[1], beta, alpha), prompt, cfg,
                           chat=chat, on_token=on_token)


def proxy_generate(base: Engine, tuned_small: Engine, base_small: Engine, prompt: str | list[int],
                   cfg: GenConfig | None = None, *, chat: bool = False,
                   on_token: Callable[[int, str], None] | None = None) -> GenResult:
    """Proxy-tuned decoding: ``base`` steered by ``tuned_small − base_small``."""
    return guided_generate([base, tuned_small, base_small], lambda lg: proxy_logits(*lg), prompt, cfg,
                           chat=chat, on_token=on_token)
