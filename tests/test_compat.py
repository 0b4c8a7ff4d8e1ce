"""transformers compatibility (slimlm/models/compat.py), scoped logging and device helpers.

Marked ``smoke``: CI also runs these against the lowest supported transformers (scripts/ci-lowest.sh),
so they use tiny random-initialised models built with ``from_config`` (no download, ~1 s).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimlm.devices import resolve_device, resolve_dtype, synchronize, timer
from slimlm.errors import SlimlmError
from slimlm.models.compat import cache_kwargs, output_cache

pytestmark = pytest.mark.smoke


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_cached_decode_matches_full_forward_without_deprecation(tiny_llama) -> None:
    """Prefill + one cached step through the shim equals one full forward, and nothing is deprecated."""
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        full = tiny_llama(input_ids=ids, use_cache=False).logits[:, -1]
        out = tiny_llama(input_ids=ids[:, :-1], use_cache=True)
        cache = output_cache(out)
        assert cache is not None and cache.get_seq_length() == 8
        step = tiny_llama(input_ids=ids[:, -1:], **cache_kwargs(tiny_llama, cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_shim_picks_the_name_the_installed_version_takes(tiny_llama) -> None:
    import inspect

    takes_new = "cache" in inspect.signature(type(tiny_llama).forward).parameters
    assert list(cache_kwargs(tiny_llama, None)) == (["cache"] if takes_new else ["past_key_values"])


def test_generate_with_a_cache_through_the_shim(tiny_llama) -> None:
    from transformers import DynamicCache

    ids = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = tiny_llama.generate(ids, **cache_kwargs(tiny_llama, DynamicCache(config=tiny_llama.config)),
                                  max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


def test_quiet_transformers_restores_the_callers_verbosity() -> None:
    from transformers.utils import logging as hf_logging

    from slimlm.models.load import quiet_transformers

    hf_logging.set_verbosity_info()
    try:
        with quiet_transformers():
            assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_devices_resolve_and_refuse_in_one_line() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is torch.float32
    with pytest.raises(SlimlmError, match="not supported"):
        resolve_dtype("int3")
    with pytest.raises(SlimlmError, match="cuda:99"):
        resolve_device("cuda:99")
    with pytest.raises(SlimlmError, match="not a device|not supported"):
        resolve_device("toaster")
    synchronize("cpu")
    assert timer("cpu") > 0


def test_load_moves_the_model_to_the_device_and_dtype(tmp_path, tiny_llama) -> None:
    """``slimlm.load(..., device=, dtype=)`` on a saved HF folder; CUDA too when this machine has it."""
    import slimlm
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tiny_llama.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(64)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = slimlm.load(tmp_path, device=device, dtype="bfloat16")
    p = next(lm.model.parameters())
    assert p.device.type == device and p.dtype is torch.bfloat16
    with torch.no_grad():
        assert lm.model(input_ids=torch.tensor([[1, 2]], device=device)).logits.shape == (1, 2, 64)


def test_real_model_round_trip(small_default, shakespeare_eval, tmp_path) -> None:
    """The default model (2 blocks) through load → perplexity → cached decode → RTN-4 → save → reload."""
    import slimlm
    from slimlm.eval.quality import perplexity
    from slimlm.runtime.kvcache import cached_perplexity, generate_with_kv

    lm = small_default(2)
    ppl = perplexity(lm.model, lm.tokenizer, shakespeare_eval, window=128, max_tokens=300, progress=False)
    assert ppl["tokens"] >= 100 and ppl["perplexity"] > 1
    ids = lm.tokenizer("To be, or not to be, that is the question", return_tensors="pt").input_ids[0]
    cached = cached_perplexity(lm.model, ids, prefix=4, chunk=3)
    with torch.no_grad():
        logits = lm.model(input_ids=ids[None]).logits[0, 3:-1].float()
    full = float(torch.nn.functional.cross_entropy(logits, ids[4:]))
    assert abs(cached["nll"] - full) < 1e-4
    out, _ = generate_with_kv(lm.model, ids[:6], kv_bits=None, max_new_tokens=4)
    assert out.shape == (1, 10)
    res = slimlm.compress(lm, "steps:\n  - rtn: {bits: 4, group_size: 128}\n", out=tmp_path / "art")
    again = slimlm.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(res.model.model(input_ids=ids[None]).logits, again.model(input_ids=ids[None]).logits)
