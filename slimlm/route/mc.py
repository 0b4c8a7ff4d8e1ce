"""Evidence for multiple-choice answers (PIQA, HellaSwag): the chosen option and how sure the model is.

Options are scored as in :mod:`slimlm.eval.tasks.run` (lm-eval conventions through
:meth:`SlimlmLM.encode_pair`); the answer is the ``acc_norm`` choice (log-likelihood per UTF-8 byte).
Unlike the task scorer, which needs only sums, this keeps every token's log-prob and predictive
entropy, because the confidence signals are functions of them. The distribution over options is the
softmax of the per-byte scores rescaled to the mean option length (same argmax as ``acc_norm``);
``agreement`` draws k answers from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from slimlm.eval.lm import Pair, SlimlmLM
from slimlm.route.signals import Evidence, choice_probs


@dataclass
class TokenStats:
    logprobs: list[float]
    entropies: list[float]


@torch.no_grad()
def token_stats(slm: SlimlmLM, pairs: Sequence[Pair]) -> list[TokenStats]:
    """Per-token log-prob and entropy of each continuation, in right-padded batches (longest first)."""
    out: list[TokenStats | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    start = 0
    while start < len(order):
        longest = len(pairs[order[start]][0]) + len(pairs[order[start]][1])
        size = max(1, min(slm.max_batch, slm.batch_tokens // max(longest, 1)))
        chunk = order[start : start + size]
        rows = [(pairs[i][0] + pairs[i][1])[-(slm.max_length + 1):][:-1] for i in chunk]
        conts = [pairs[i][1][-slm.max_length:] for i in chunk]
        ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # (B, T)
        n_keep = max(map(len, conts))
        keep = torch.zeros(len(rows), n_keep, dtype=torch.long)  # (B, K) positions predicting the continuation
        for b, (row, cont) in enumerate(zip(rows, conts)):
            ids[b, : len(row)] = torch.tensor(row)
            pos = list(range(len(row) - len(cont), len(row)))
            keep[b] = torch.tensor(pos + [pos[-1]] * (n_keep - len(pos)))
        logits = slm.model(input_ids=ids.to(slm.device), use_cache=False, logits_to_keep=keep.to(slm.device)).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
        ent = -(logp.exp() * logp).sum(-1)  # (B, K)
        for b, (i, cont) in enumerate(zip(chunk, conts)):
            target = torch.tensor(cont, device=logp.device)
            lp = logp[b, : len(cont)].gather(-1, target[:, None])[:, 0]
            out[i] = TokenStats(lp.tolist(), ent[b, : len(cont)].tolist())
        start += size
    return [s for s in out if s is not None]


def mc_evidence(stats: list[TokenStats], choices: list[str], *, k: int = 8, seed: int = 0) -> tuple[int, Evidence]:
    """(chosen option, its evidence) from the options' token statistics."""
    nbytes = [max(len(c.encode("utf-8")), 1) for c in choices]
    mean_bytes = sum(nbytes) / len(nbytes)
    scores = [sum(s.logprobs) / n * mean_bytes for s, n in zip(stats, nbytes)]
    best = max(range(len(scores)), key=scores.__getitem__)
    rng = random.Random(seed)
    samples = [str(i) for i in rng.choices(range(len(scores)), weights=choice_probs(scores), k=k)]
    ev = Evidence(answer=str(best), token_logprobs=stats[best].logprobs, token_entropies=stats[best].entropies,
                  samples=samples, choice_logprobs=scores)
    return best, ev


def score_items(slm: SlimlmLM, items: Sequence[tuple[str, list[str]]], *, delimiter: str = " ", k: int = 8,
                seed: int = 0) -> list[tuple[int, Evidence]]:
    """Answer and evidence for each (context, options) item (``delimiter`` goes between them, as in tasks)."""
    pairs = [slm.encode_pair(ctx, delimiter + c) for ctx, choices in items for c in choices]
    stats = token_stats(slm, pairs)
    out, at = [], 0
    for j, (_, choices) in enumerate(items):
        out.append(mc_evidence(stats[at : at + len(choices)], choices, k=k, seed=seed + j))
        at += len(choices)
    return out
