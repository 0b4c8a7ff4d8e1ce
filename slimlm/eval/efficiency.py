"""Efficiency figures that matter on a laptop: size, memory, time to first token, tokens per second."""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.devices import timer
from slimlm.models.compat import cache_kwargs, output_cache
from slimlm.models.load import LoadedModel

PROMPT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
    "that lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with "
    "victorious wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry "
    "meetings, our dreadful marches to delightful measures. Grim-visaged war hath smooth'd his wrinkled "
    "front; and now, instead of mounting barded steeds to fright the souls of fearful adversaries, he "
    "capers nimbly in a lady's chamber to the lascivious pleasing of a lute."
)


def weight_bytes_in_memory(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def bytes_on_disk(folder: str | None) -> int | None:
    """Bytes of the weight files of the folder the model was read from."""
    if not folder:
        return None
    files = [p for ext in ("*.safetensors", "*.bin", "*.gguf") for p in Path(folder).glob(ext)]
    return sum(p.stat().st_size for p in files)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@torch.no_grad()
def _greedy_run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds for the remaining ``new_tokens - 1``), greedy with KV cache."""
    t0 = timer(ids.device)
    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    ttft = timer(ids.device) - t0
    past = output_cache(out)
    t1 = timer(ids.device)
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, **cache_kwargs(model, past), use_cache=True)
        past = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return ttft, timer(ids.device) - t1


def efficiency(lm: LoadedModel, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Size and speed of ``lm``: medians over ``repeats`` runs after one warm-up."""
    model, tok = lm.model, lm.tokenizer
    device = next(model.parameters()).device
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids[:, :prompt_tokens]
    if lm.info.add_bos:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    ids = ids.to(device)
    _greedy_run(model, ids, 4)  # warm-up: allocator, kernels, lazy init
    ttfts, decodes = [], []
    for _ in range(repeats):
        ttft, dec = _greedy_run(model, ids, new_tokens)
        ttfts.append(ttft)
        decodes.append(dec)
    ttft = statistics.median(ttfts)
    dec = statistics.median(decodes)
    return {
        "params": lm.info.n_params,
        "bytes_on_disk": bytes_on_disk(lm.info.weights_dir),
        "weight_bytes_in_memory": weight_bytes_in_memory(model),
        "peak_rss_bytes": peak_rss_bytes(),
        "prompt_tokens": int(ids.shape[1]),
        "ttft_s": ttft,
        "prefill_tok_s": ids.shape[1] / ttft,
        "decode_tok_s": (new_tokens - 1) / dec,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
