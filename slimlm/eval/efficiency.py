"""Efficiency figures that matter on a laptop: size, memory, time to first token, tokens per second.

Speed is measured through the generation engine (:mod:`slimlm.runtime.engine`): the same static-cache
decode and fast kernels that ``slimlm generate`` uses.
"""

from __future__ import annotations

import resource
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.models.load import LoadedModel
from slimlm.runtime.kernels import describe

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


def greedy_run(lm: LoadedModel, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds for the other ``new_tokens - 1``) of greedy engine decoding, EOS ignored."""
    from slimlm.runtime.engine import engine_for
    from slimlm.runtime.sampling import GenConfig

    need = max(len(p) for p in prompts) + new_tokens + 1
    engine = engine_for(lm, max_seq=-(-need // 512) * 512)  # rounded up: no re-sizing between runs
    res = engine.generate(prompts, GenConfig(max_new_tokens=new_tokens, stop_at_eos=False))[0]  # type: ignore[index]
    return res.ttft_s, (new_tokens - 1) / res.decode_tok_s if res.decode_tok_s else 0.0


def prompt_ids(lm: LoadedModel, prompt_tokens: int) -> list[int]:
    """The first ``prompt_tokens`` tokens of :data:`PROMPT` (repeated as needed), BOS first where wanted."""
    tok = lm.tokenizer
    ids = tok(PROMPT, add_special_tokens=False).input_ids
    ids = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    return ([tok.bos_token_id] if lm.info.add_bos else []) + ids


def efficiency(lm: LoadedModel, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Size and speed of ``lm``: medians over ``repeats`` runs after one warm-up."""
    ids = prompt_ids(lm, prompt_tokens)
    greedy_run(lm, [ids], 4)  # warm-up: allocator, kernels, lazy init
    runs = [greedy_run(lm, [ids], new_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    decode = (new_tokens - 1) / statistics.median(r[1] for r in runs)
    from slimlm.runtime.engine import engine_for

    engine = engine_for(lm)
    return {
        "params": lm.info.n_params,
        "bytes_on_disk": bytes_on_disk(lm.info.weights_dir),
        "weight_bytes_in_memory": weight_bytes_in_memory(lm.model),
        "peak_rss_bytes": peak_rss_bytes(),
        "prompt_tokens": len(ids),
        "ttft_s": ttft,
        "prefill_tok_s": len(ids) / ttft,
        "decode_tok_s": decode,
        "engine_dtype": str(engine.dtype).removeprefix("torch."),
        "kernel_paths": describe(engine.paths),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
