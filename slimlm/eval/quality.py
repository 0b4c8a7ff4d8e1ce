"""Perplexity over non-overlapping windows (GPTQ-paper convention), BOS per window where wanted."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimlm.data import check_window, context_length, encode, eval_windows
from slimlm.errors import SlimlmError

LOGITS_BUDGET = 1 << 29  # bytes of fp32 logits per forward batch
MIN_SCORED_TOKENS = 100  # fewer, and one unlucky token moves the figure by tens of percent


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, text: str, *, window: int = 512, add_bos: bool = False,
               max_tokens: int | None = None, progress: bool = True) -> dict[str, Any]:
    """exp(mean NLL) over every predicted token of ``text`` cut into ``window``-token windows."""
    if window < 2 + add_bos:
        raise SlimlmError(f"perplexity window {window} is too short", f"use a window of at least {2 + add_bos} tokens (512 is usual)")
    check_window("perplexity window", window, context_length(model), "use a shorter --window")
    if max_tokens is not None and max_tokens < MIN_SCORED_TOKENS + 1:
        raise SlimlmError(f"max_tokens {max_tokens} leaves fewer than {MIN_SCORED_TOKENS} tokens to score",
                          f"use at least {MIN_SCORED_TOKENS + 1} (or 0 = all)")
    bos = tokenizer.bos_token_id if add_bos else None
    windows = eval_windows(encode(tokenizer, text), window, bos, max_tokens)
    scored = sum(len(w) - 1 for w in windows)
    if scored < MIN_SCORED_TOKENS:
        raise SlimlmError(f"the evaluation text gives only {scored} token(s) to score; a perplexity needs at least {MIN_SCORED_TOKENS}",
                          "evaluate a longer text (the last 10 % of a .txt source is its evaluation split)")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    batch = max(1, LOGITS_BUDGET // (window * vocab * 4))
    nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch), desc="perplexity", unit="batch", disable=not progress):
        group = windows[start : start + batch]
        same = [w for w in group if len(w) == len(group[0])]
        for chunk in (same, [w for w in group if len(w) != len(group[0])]):
            if not chunk:
                continue
            ids = torch.stack(chunk).to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "window": window, "windows": len(windows), "bos": bos is not None}
