"""Speculative decoding: the acceptance rule keeps the target's distribution, greedy output equals the
target's own, prompt lookup finds copies, adaptive k moves the right way."""

from __future__ import annotations

import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig
from slimlm.runtime.speculative import (LookupDraft, ModelDraft, SelfDraft, SpecConfig, accept_greedy, accept_sampled, make_draft,
                                        lookup_ngram, next_k, speculative_generate)

CHI2_DF7_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _dist(gen: torch.Generator, v: int) -> torch.Tensor:
    return torch.softmax(torch.randn(v, generator=gen) * 1.5, -1)


@pytest.mark.parametrize("draft_kind", ["sampled", "deterministic"])
def test_acceptance_rule_preserves_target_distribution(draft_kind: str) -> None:
    """First emitted token ~ p_1 whatever q is (Leviathan et al. 2023, Theorem 3.5), on an 8-token vocabulary."""
    gen = torch.Generator().manual_seed(0)
    v, k, n = 8, 3, 20_000
    p = torch.stack([_dist(gen, v) for _ in range(k + 1)])  # (k+1, V) target
    q = torch.stack([_dist(gen, v) for _ in range(k)])  # (k, V) draft, deliberately different
    counts = torch.zeros(v)
    for _ in range(n):
        if draft_kind == "sampled":
            drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
            kept, nxt = accept_sampled(p, q, drafts, gen)
        else:  # a fixed guess (prompt lookup): q is one-hot at it
            drafts = [2, 5, 1]
            kept, nxt = accept_sampled(p, None, drafts, gen)
        counts[drafts[0] if kept > 0 else nxt] += 1
    assert _chi2(counts, p[0]) < CHI2_DF7_P001, (counts / n, p[0])
    # The rule is not vacuous: the draft's own distribution is rejected by the same test.
    if draft_kind == "sampled":
        assert _chi2(counts, q[0]) > CHI2_DF7_P001


def test_bonus_token_comes_from_the_last_target_row() -> None:
    gen = torch.Generator().manual_seed(1)
    v = 8
    p = torch.stack([_dist(gen, v) for _ in range(3)])
    q = p[:2].clone()  # draft == target: always accepted
    counts = torch.zeros(v)
    for _ in range(10_000):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
        kept, nxt = accept_sampled(p, q, drafts, gen)
        assert kept == 2
        counts[nxt] += 1
    assert _chi2(counts, p[2]) < CHI2_DF7_P001


def test_greedy_acceptance_and_adaptive_k() -> None:
    assert accept_greedy([5, 6, 7, 8], [5, 6, 9]) == (2, 7)
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == (3, 8)
    assert accept_greedy([4], []) == (0, 4)
    spec = SpecConfig(k=4, k_min=2, k_max=5)
    assert next_k(4, 4, 4, spec) == 5 and next_k(5, 5, 5, spec) == 5  # grow on full acceptance, capped
    assert next_k(4, 1, 4, spec) == 3 and next_k(2, 0, 2, spec) == 2  # shrink on early rejection, floored
    assert next_k(4, 3, 4, spec) == 4
    assert next_k(4, 0, 4, SpecConfig(adaptive=False)) == 4


def test_prompt_lookup_finds_the_continuation_of_a_repeated_ngram(default_lm) -> None:
    assert lookup_ngram([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]
    assert lookup_ngram([1, 2, 9, 7, 1, 2, 8, 1, 2], 1) == [8]  # the latest earlier occurrence wins
    assert lookup_ngram([1, 2, 3], 4) == []
    tok = default_lm.tokenizer
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    ids = tok(f"{text} Again: {text}")["input_ids"]
    cut = len(ids) - 6  # the second copy, six tokens before its end
    assert lookup_ngram(ids[:cut], 5) == ids[cut:cut + 5]


@pytest.fixture(scope="module")
def small_pair() -> tuple[Engine, Engine]:
    """A truncated SmolLM2 target (8 blocks) and a 3-block draft cut from it: same tokenizer, real weights."""
    target = slimlm.load("default")
    drop_blocks(target.model, target.arch, set(range(8, 30)))
    draft = slimlm.load("default")
    drop_blocks(draft.model, draft.arch, set(range(3, 30)))
    return Engine(target, max_seq=256), Engine(draft, max_seq=256)


PROMPT = ("The river flows past the old mill, and the miller watches the river flow. "
          "The river flows past the old mill, and the miller")


@pytest.mark.parametrize("kind", ["model", "self", "lookup"])
def test_speculative_greedy_equals_target_greedy(small_pair, kind: str) -> None:
    target, draft_engine = small_pair
    cfg = GenConfig(max_new_tokens=24, stop_at_eos=False)
    want = target.generate(PROMPT, cfg)
    draft = {"model": lambda: ModelDraft(draft_engine), "self": lambda: SelfDraft(3), "lookup": lambda: LookupDraft()}[kind]()
    got = speculative_generate(target, draft, PROMPT, cfg, SpecConfig(k=3, k_max=6))
    assert got.tokens == want.tokens, (kind, got.text, want.text)
    assert got.text == want.text and got.finish_reason == "length"
    assert got.proposed > 0 and 0 <= got.accepted <= got.proposed
    assert got.target_forwards < len(got.tokens) or kind != "lookup"  # the repeated prompt is copied several tokens a step


def test_speculative_sampling_runs_seeded(small_pair) -> None:
    target, draft_engine = small_pair
    cfg = GenConfig(max_new_tokens=16, temperature=0.8, top_k=50, seed=3, stop_at_eos=False)
    a = speculative_generate(target, ModelDraft(draft_engine), PROMPT, cfg)
    b = speculative_generate(target, ModelDraft(draft_engine), PROMPT, cfg)
    assert a.tokens == b.tokens and len(a.tokens) == 16
    assert all(lp <= 0 for lp in a.logprobs)


def test_cli_refuses_bad_strategy_options(capsys) -> None:
    from slimlm.cli import main

    assert main(["speculate", "default", "hi"]) == 2
    assert "exactly one of --draft, --amateur, --proxy" in capsys.readouterr().err
    assert main(["speculate", "default", "hi", "--draft", "lookup", "--k", "0"]) == 2
    assert main(["speculate", "default", "hi", "--amateur", "default", "--beta", "-1"]) == 2


def test_make_draft_validates_its_spec(small_pair) -> None:
    target, _ = small_pair
    assert isinstance(make_draft("lookup:2", target), LookupDraft) and make_draft("self:3", target).n_blocks == 3
    for bad in ("self:8", "self:x", "self"):
        with pytest.raises(SlimlmError, match="draft"):
            make_draft(bad, target)


def test_cli_speculates_with_prompt_lookup(capsys) -> None:
    from slimlm.cli import main

    assert main(["speculate", "default", "one two three four one two three four one two", "--draft", "lookup",
                 "--max-new-tokens", "6", "--max-seq", "128"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "draft lookup: acceptance" in out.err
