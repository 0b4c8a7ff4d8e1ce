"""Trust suites: scorers against hand-computed log-likelihoods on a real (truncated) SmolLM2, MC2
normalisation, CrowS-Pairs symmetry, seeded perturbations, canary exposure on a tiny model trained
here, comparison flags, the CLI, and the trust card in the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm.eval.lm import SlimlmLM
from slimlm.eval.tasks.run import load_docs, mc_item
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.trust.perturb import PERTURBATIONS, perturb
from slimlm.trust.prefix import common_prefix, score_shared_prefix
from slimlm.trust.spec import load_trust_task, task_spec
from slimlm.trust.stats import auc, degraded, mean_metric, paired_delta
from slimlm.trust.suites import mc1, mc2, pair_preference, score_crows, score_truthfulqa

from conftest import data_dir_or_skip


@pytest.fixture(scope="module")
def small_lm() -> slimlm.LoadedModel:
    """SmolLM2-135M cut to 3 of its 30 blocks: real weights, real tokenizer, fast."""
    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(30)) - {0, 15, 29})
    return lm


def hand_loglik(lm: slimlm.LoadedModel, context: str | list[int], continuation: str) -> float:
    """Σ log p(continuation tokens | context) from one plain forward pass over the joint encoding
    (a token-id context is prepended as is: the prefix token of an empty context)."""
    tok = lm.tokenizer
    if isinstance(context, list):
        ctx, whole = context, context + tok(continuation, add_special_tokens=False).input_ids
    else:
        ctx = tok(context, add_special_tokens=False).input_ids
        whole = tok(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(input_ids=ids).logits.float(), -1)[0]
    return float(sum(logp[t - 1, whole[t]] for t in range(len(ctx), len(whole))))


def test_truthfulqa_scores_equal_hand_sums(small_lm):
    data_dir_or_skip()
    spec = task_spec(load_trust_task("truthfulqa"), limit=2)
    docs = load_docs(spec)
    slm = SlimlmLM(small_lm)
    items = [mc_item(d, spec) for d in docs]
    pairs = [slm.encode_pair(ctx, " " + c) for ctx, choices, _ in items for c in choices]
    assert common_prefix(pairs) > 100  # the six-shot primer is shared
    cached = score_shared_prefix(slm, pairs)
    hand = [hand_loglik(small_lm, ctx, " " + c) for ctx, choices, _ in items for c in choices]
    assert cached == pytest.approx(hand, abs=2e-3)
    assert cached == pytest.approx([ll for ll, _ in slm.score_pairs(pairs)], abs=2e-3)
    metrics = {m.name: m for m in score_truthfulqa(slm, docs, spec, {})}
    at, want1, want2 = 0, [], []
    for doc, (_, choices, _) in zip(docs, items):
        ll = hand[at : at + len(choices)]
        at += len(choices)
        k = doc["n_correct"]
        want1.append(max(doc["mc1_choices"], key=lambda i: ll[i]) == 0)
        p = np.exp(ll)
        want2.append(p[:k].sum() / p.sum())
    assert metrics["mc1"].value == pytest.approx(np.mean(want1))
    assert metrics["mc2"].value == pytest.approx(np.mean(want2), abs=1e-4)


def test_mc2_is_normalised_probability_mass():
    lp = [math.log(0.2), math.log(0.1)]
    assert mc2(lp, [math.log(0.1)]) == pytest.approx(0.75)
    shifted = [x - 500 for x in lp]  # long answers: tiny probabilities, same ratio (no underflow)
    assert mc2(shifted, [math.log(0.1) - 500]) == pytest.approx(0.75)
    assert 0 <= mc2([-3.0], [-1.0, -2.0]) <= 1
    assert mc1([-1.0, -5.0, -2.0], [0, 2]) and not mc1([-3.0, -5.0, -2.0], [0, 2])


def test_crows_pair_scoring_is_symmetric_under_swapping(small_lm):
    data_dir_or_skip()
    t = load_trust_task("crows_pairs")
    spec = task_spec(t, limit=12)
    docs = load_docs(spec)
    swapped = [{**d, "sent_more": d["sent_less"], "sent_less": d["sent_more"]} for d in docs]
    slm = SlimlmLM(small_lm)
    a = {m.name: m for m in score_crows(slm, docs, spec, {})}
    b = {m.name: m for m in score_crows(slm, swapped, spec, {})}
    assert a["pct_stereotype"].items["x"] + b["pct_stereotype"].items["x"] == pytest.approx(np.ones(12))
    assert a["bias"].value == pytest.approx(b["bias"].value)
    ll = hand_loglik(small_lm, [slm.prefix_id], docs[0]["sent_more"]), hand_loglik(small_lm, [slm.prefix_id], docs[0]["sent_less"])
    assert a["pct_stereotype"].items["x"][0] == pair_preference(*ll)
    assert pair_preference(1.0, 1.0) == 0.5


def test_perturbations_are_deterministic_per_seed():
    text = "The quick brown fox jumps over the lazy dog near the old river bank today"
    for kind in PERTURBATIONS:
        once = perturb(text, kind, 0.5, seed=3, key=7)
        assert once == perturb(text, kind, 0.5, seed=3, key=7)
        assert once != text
        assert any(perturb(text, kind, 0.5, seed=s, key=7) != once for s in range(4, 9))
    assert perturb(text, "word_drop", 1.0, 0, 0) == "The"
    assert perturb(text, "typo", 0.0, 0, 0) == text


def test_paired_delta_and_flags():
    base = mean_metric("acc", np.array([1.0] * 80 + [0.0] * 20), +1)
    worse = mean_metric("acc", np.array([1.0] * 50 + [0.0] * 50), +1)
    d, se = paired_delta(worse, base)
    assert d == pytest.approx(-0.3) and 0 < se < 0.1 and degraded(d, se, +1)
    d, se = paired_delta(base, base)
    assert d == 0 and not degraded(d, se, +1)
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0 and auc(np.array([1.0]), np.array([1.0])) == 0.5


@pytest.fixture(scope="module")
def tiny_pair(default_lm, tmp_path_factory):
    """Two 2-layer llamas (from_config, d=64) fine-tuned by slimlm's trainer for 80 steps on the same
    text, one with 4 canaries planted 30× each; returns (with, without, canaries)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimlm.data import load_text
    from slimlm.distill import DistillConfig, train
    from slimlm.models.load import LoadedModel, make_info
    from slimlm.trust.privacy import make_canaries, plant

    tok = default_lm.tokenizer
    canaries = make_canaries(4, seed=1, digits=4)
    text = load_text("shakespeare", "calib")[:1500]
    out = []
    for planted in (True, False):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        path = tmp_path_factory.mktemp("canary") / "train.txt"
        path.write_text(plant(text, canaries, 30, seed=0) if planted else text)
        train(model, None, tok, DistillConfig(loss="lm", steps=80, batch_size=8, seq_len=32, lr=3e-3, train_embeddings=True,
                                              progress=False), data=str(path))
        out.append(LoadedModel(model, tok, make_info(model, tok, "tiny", "test", "0")))
    return out[0], out[1], canaries


def test_canary_exposure_high_when_trained_on_it_and_chance_otherwise(tiny_pair):
    from slimlm.trust.privacy import exposure_metric

    seen, unseen, canaries = tiny_pair
    hi = exposure_metric(SlimlmLM(seen), canaries, m=200).value
    lo = exposure_metric(SlimlmLM(unseen), canaries, m=200).value
    top = math.log2(201)
    assert hi > 0.8 * top, (hi, lo)
    assert lo < 3.5, (hi, lo)  # a uniform rank gives log2(e) ≈ 1.44 bits on average


def test_membership_inference_sees_training_windows(tiny_pair):
    from slimlm.data import load_text
    from slimlm.trust.privacy import disjoint_windows, mia_metrics

    seen, _, _ = tiny_pair
    slm = SlimlmLM(seen)
    calib = load_text("shakespeare", "calib")
    members = disjoint_windows(slm, calib[:1300], 32, 8)
    held = disjoint_windows(slm, calib[50_000:52_000], 32, 8)
    m = {x.name: x for x in mia_metrics(slm, members, held)}
    assert m["mia_auc_loss"].value > 0.8 and m["mia_auc_mink"].value > 0.7 and m["loss_gap"].value > 0


def test_cli_trust_against_base_and_report_card(tmp_path, monkeypatch, capsys):
    data_dir_or_skip()
    from slimlm.cli import main
    from slimlm.report import build_report

    db = tmp_path / "r.db"
    monkeypatch.setenv("SLIMLM_RESULTS_DB", str(db))
    assert main(["trust", "default", "--suite", "nope"]) == 2
    assert main(["trust", "default", "--against", "default", "--suite", "bias", "--n", "6", "--ppl-tokens", "512", "--label", "default/again"]) == 0
    out = capsys.readouterr().out
    assert "pct_stereotype" in out and "+0.0000" in out  # the same model: zero change, no flag
    html = build_report(tmp_path / "report.html", db=db).read_text()
    assert 'id="trust-card"' in html and "default/again vs default" in html and "crows_pairs" in html
    assert 'id="leaderboard"' in html and "<h2>Recipes</h2>" in html  # the rest of the report is intact


def test_trust_card_in_headless_chromium(tmp_path):
    import subprocess

    from test_report import chromium

    from slimlm.report import build_report
    from slimlm.store import ResultsStore

    exe = chromium()
    store = ResultsStore(tmp_path / "r.db")
    common = {"kind": "trust", "model": "default/gptq3", "against": "default"}
    store.add_rows([{**common, "task": "trust:truthfulqa", "mc1": 0.2, "mc1_stderr": 0.02, "mc1_delta": -0.08,
                     "mc1_delta_stderr": 0.02, "mc1_degraded": 1.0, "mc1_hidden": 1.0},
                    {**common, "task": "perplexity:wikitext2", "perplexity": 30.0, "perplexity_stderr": 2.0, "perplexity_delta": 0.5,
                     "perplexity_delta_stderr": 0.4, "perplexity_degraded": 0.0, "perplexity_hidden": 0.0},
                    {"task": "hellaswag", "model": "default/gptq3", "acc_norm": 0.4}])
    report = build_report(tmp_path / "report.html", db=tmp_path / "r.db")
    dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", f"file://{report}"],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom and 'id="trust-card"' in dom and 'id="trust-0"' in dom
    assert 'class="flag-hidden"' in dom and "1 hidden degradation" in dom
