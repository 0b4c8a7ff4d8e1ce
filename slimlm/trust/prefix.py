"""Scoring many continuations that share a long prompt (a few-shot primer) with one cached prefix.

TruthfulQA's lm-eval prompt puts the same six worked questions in front of every request, so ~80 %
of the tokens a plain ``loglikelihood`` call processes are identical. Here the longest token prefix
common to all requests is run once, its KV cache is copied per batch, and only the rest of each
request runs. The log-likelihoods equal ``SlimlmLM.score_pairs`` up to float rounding (tested).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from slimlm.eval.lm import Pair, SlimlmLM
from slimlm.models.compat import cache_kwargs, output_cache

MIN_PREFIX = 16  # tokens; a shorter shared prefix is not worth a cache


def common_prefix(pairs: Sequence[Pair]) -> int:
    """Length of the longest token prefix every context shares, leaving ≥ 1 context token per request
    (its logits predict the first continuation token)."""
    first = pairs[0][0]
    n = min(len(c) for c, _ in pairs) - 1
    for ctx, _ in pairs:
        k = 0
        while k < n and ctx[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


@torch.no_grad()
def score_shared_prefix(slm: SlimlmLM, pairs: Sequence[Pair]) -> list[float]:
    """Summed log p(continuation | context) per token pair, the shared prefix computed once."""
    if not pairs:
        return []
    p = common_prefix(pairs)
    longest = max(len(c) + len(x) for c, x in pairs)
    if p < MIN_PREFIX or longest > slm.max_length:
        return [ll for ll, _ in slm.score_pairs(pairs)]
    device = slm.device
    prefix = output_cache(slm.model(input_ids=torch.tensor([pairs[0][0][:p]], device=device), use_cache=True, logits_to_keep=1))
    rest = [(c[p:], x) for c, x in pairs]
    order = sorted(range(len(rest)), key=lambda i: -(len(rest[i][0]) + len(rest[i][1])))
    out = [0.0] * len(rest)
    start = 0
    while start < len(order):
        width = len(rest[order[start]][0]) + len(rest[order[start]][1]) - 1
        size = max(1, min(slm.max_batch, slm.batch_tokens // max(width + p // 4, 1)))
        chunk = order[start : start + size]
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T), right-padded suffixes
        n_keep = max(len(rest[i][1]) for i in chunk)
        keep = torch.zeros(len(chunk), n_keep, dtype=torch.long)  # (B, K) scored positions
        for b, i in enumerate(chunk):
            ctx, cont = rest[i]
            row = (ctx + cont)[:-1]
            ids[b, : len(row)] = torch.tensor(row)
            pos = list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))
            keep[b] = torch.tensor(pos + [pos[-1]] * (n_keep - len(pos)))
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(chunk))
        logits = slm.model(input_ids=ids.to(device), **cache_kwargs(slm.model, cache), use_cache=True,
                           logits_to_keep=keep.to(device)).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
        for b, i in enumerate(chunk):
            cont = rest[i][1]
            out[i] = float(logp[b, : len(cont)].gather(-1, torch.tensor(cont, device=device)[:, None]).sum())
        start += size
    return out
