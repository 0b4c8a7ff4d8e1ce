"""Confidence signals, the cascade policy, threshold tuning and the learned router."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from slimlm.cli import main
from slimlm.route import signals, tune
from slimlm.route.cascade import Cascade
from slimlm.route.config import RouterConfig, load_router
from slimlm.route.learned import fit_logistic
from slimlm.route.signals import Evidence
from slimlm.route.tiers import Need, Query, TierAnswer


def test_quantile_signals_are_not_length_biased():
    short = Evidence(token_logprobs=[-0.1, -0.2])
    long = Evidence(token_logprobs=[-0.1, -0.2] * 20)  # the same per-token confidence, 20x longer
    for name in ("lp_min", "lp_mean", "lp_q10", "lp_q50"):
        fn = signals.SIGNALS.get(name)
        assert fn(short) == pytest.approx(fn(long), abs=0.011), name
    assert signals.SIGNALS.get("seq_logprob")(long) < 10 * signals.SIGNALS.get("seq_logprob")(short)
    assert signals.quantile([3.0, 1.0, 2.0, 4.0], 0.5) == pytest.approx(np.quantile([3, 1, 2, 4], 0.5))
    assert signals.SIGNALS.get("lp_min")(Evidence()) == -math.inf


def test_choice_signals_and_agreement():
    sure = Evidence(answer="0", choice_logprobs=[0.0, -6.0], samples=["0"] * 5)
    unsure = Evidence(answer="0", choice_logprobs=[0.0, -0.1], samples=["0", "1", "1", "0", "1"])
    for name in ("neg_entropy", "margin", "agreement"):
        fn = signals.SIGNALS.get(name)
        assert fn(sure) > fn(unsure), name
    assert signals.SIGNALS.get("agreement")(unsure) == pytest.approx(0.4)
    assert signals.SIGNALS.get("neg_entropy")(Evidence(token_entropies=[1.0, 3.0])) == -2.0


def synthetic(n: int = 400, seed: int = 0):
    """A small model right 60 % of the time whose confidence is informative, a large one right 80 %."""
    rng = np.random.default_rng(seed)
    small_ok = rng.random(n) < 0.6
    large_ok = np.where(small_ok, rng.random(n) < 0.9, rng.random(n) < 0.65)
    conf = np.where(small_ok, rng.normal(-0.5, 0.5, n), rng.normal(-2.0, 0.7, n))
    return conf, small_ok, large_ok


def test_tune_reaches_target_with_fewer_escalations_than_random():
    conf, small_ok, large_ok = synthetic()
    res = tune.tune([conf], [small_ok, large_ok], ratio=0.98)
    assert res.met and res.accuracy >= 0.98 * large_ok.mean() - 1e-12
    random_rate = (0.98 * large_ok.mean() - small_ok.mean()) / (large_ok.mean() - small_ok.mean())
    assert res.escalation < random_rate - 0.1
    assert res.escalation == pytest.approx(tune.rate_for(conf, small_ok, large_ok, res.target_accuracy), abs=1 / len(conf))
    # the chosen threshold reproduces the dev-set figures
    acc, esc, _ = tune.simulate(res.thresholds, [conf], [small_ok, large_ok], [1, 10])
    assert (acc, esc) == (pytest.approx(res.accuracy), pytest.approx(res.escalation))
    assert tune.apgr(conf, small_ok, large_ok) > 0.6
    assert tune.apgr(np.zeros(len(conf)), small_ok, large_ok) == pytest.approx(0.5, abs=0.1)


def test_three_tiers_tune_and_unreachable_target():
    rng = np.random.default_rng(1)
    conf0, ok0, ok2 = synthetic(300, 2)
    ok1 = np.where(ok0, True, rng.random(300) < 0.5)
    conf1 = np.where(ok1, rng.normal(0, 0.5, 300), rng.normal(-2, 0.5, 300))
    res = tune.tune([conf0, conf1], [ok0, ok1, ok2], ratio=0.98, costs=[1, 3, 10])
    assert res.met and len(res.thresholds) == 2
    never = tune.tune([conf0], [ok0, np.ones(300, dtype=bool)], ratio=1.2)
    assert not never.met and never.accuracy == 1.0


def test_learned_router_separates():
    conf, small_ok, _ = synthetic(300)
    x = np.stack([conf, np.random.default_rng(3).normal(size=300)], 1)
    router = fit_logistic(x, small_ok.astype(float), ["lp_min", "margin"])
    p = router.predict_features(x)
    assert ((p > 0.5) == small_ok).mean() > 0.85
    assert abs(router.weights[0]) > 3 * abs(router.weights[1])  # the informative feature dominates


class FixedTier:
    def __init__(self, name: str, conf: float, remote: bool = False) -> None:
        self.name, self.conf, self.remote, self.calls = name, conf, remote, 0

    def answer(self, query: Query, need: Need) -> TierAnswer:
        self.calls += 1
        return TierAnswer(self.name, 1, 1, "stop", Evidence(answer=self.name, token_logprobs=[self.conf]))


@pytest.mark.parametrize("threshold,expect", [(-1.01, "small"), (-0.99, "mid"), (1e9, "large")])
def test_decisions_follow_the_threshold(tmp_path, threshold, expect):
    cfg = RouterConfig(signal="lp_min", log=str(tmp_path / "log.jsonl"),
                       tiers=[{"name": "small", "model": "a", "threshold": threshold},
                              {"name": "mid", "model": "b", "threshold": 0.5 if expect == "mid" else 1e9},
                              {"name": "large", "model": "c"}])
    tiers = [FixedTier("small", -1.0), FixedTier("mid", 0.6), FixedTier("large", 0.0)]
    ans, dec = Cascade(cfg, tiers).answer(Query(prompt="q"))
    assert ans.text == expect and dec.answered_by == expect
    assert [s["escalate"] for s in dec.steps if "escalate" in s] == [t != expect for t in ("small", "mid")][: len(dec.steps) - (expect == "large")]


def test_untuned_router_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("tiers:\n  - {name: s, model: default}\n  - {name: l, url: 'http://x/v1'}\n")
    with pytest.raises(Exception, match="no threshold"):
        Cascade(load_router(p), [])
    p.write_text("tiers:\n  - {name: s}\n  - {name: l, url: 'http://x/v1'}\n")
    with pytest.raises(Exception, match="exactly one of"):
        load_router(p)


def test_route_tune_cli_reaches_target_on_synthetic_set(tmp_path, capsys):
    conf, small_ok, large_ok = synthetic(300, 5)
    rows = [{"tiers": [{"correct": bool(s), "evidence": {"token_logprobs": [float(c), float(c) + 0.3]}},
                       {"correct": bool(lg)}]} for c, s, lg in zip(conf, small_ok, large_ok)]
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in rows))
    router = tmp_path / "router.yaml"
    router.write_text("tiers:\n  - {name: small, model: default}\n  - {name: large, model: gemma3-270m, cost: 10}\n")
    assert main(["route", "tune", str(router), "--dev", str(dev), "--target", "0.98"]) == 0
    cfg = load_router(router)
    assert cfg.tuned["met"] and cfg.tuned["accuracy"] >= 0.98 * large_ok.mean() - 1e-12
    assert cfg.tiers[0].threshold is not None and cfg.tuned["escalation"] < 0.6
    assert "reached" in capsys.readouterr().out
    assert main(["route", "tune", str(router), "--dev", str(dev), "--signal", "nope"]) == 2


def test_report_has_cost_quality_curves(tmp_path):
    from slimlm.report import build_report

    conf, s, lg = synthetic(200, 7)
    rates = [i / 10 for i in range(1, 10)]
    sig = {"curve": dict(zip([f"{r:.0%}" for r in rates], tune.curve(conf, s, lg, rates))), "apgr": tune.apgr(conf, s, lg),
           "cpt98": tune.rate_for(conf, s, lg, 0.98 * lg.mean())}
    rnd = {"curve": dict(zip([f"{r:.0%}" for r in rates], tune.random_curve(s, lg, rates))), "apgr": 0.5, "cpt98": 0.9}
    route = tmp_path / "route.json"
    route.write_text(json.dumps({"tasks": {"piqa": {"n_heldout": 200, "small_acc": float(s.mean()), "large_acc": float(lg.mean()),
                                                    "signals": {"lp_q10": sig}, "random": rnd}}}))
    html = build_report(tmp_path / "r.html", db=tmp_path / "r.db", routes=[route]).read_text()
    assert "Cascade routing: cost/quality" in html and 'id="route-0-piqa"' in html and "<polyline" in html
    assert "leaderboard" in html  # the rest of the report is still there


@pytest.mark.slow
def test_local_tier_evidence_and_tune_on_generated_answers(default_lm, tmp_path, capsys):
    """The generation path: a real engine answers, entropies come from one prefill, k samples are drawn."""
    from slimlm.route.tiers import DirectBackend, LocalTier
    from slimlm.runtime.engine import Engine
    from slimlm.runtime.sampling import GenConfig

    tier = LocalTier("small", DirectBackend(Engine(default_lm, max_batch=3, max_seq=128)))
    ans = tier.answer(Query(prompt="The capital of France is", cfg=GenConfig(max_new_tokens=6)), Need(entropies=True, samples=3))
    ev = ans.evidence
    assert "paris" in ev.answer and len(ev.token_logprobs) == len(ev.token_entropies) == ans.completion_tokens
    assert all(e >= 0 for e in ev.token_entropies) and len(ev.samples) == 3
    assert 0 <= signals.SIGNALS.get("agreement")(ev) <= 1
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in [{"prompt": "The capital of France is", "answer": "Paris"},
                                                      {"prompt": "2 + 2 =", "answer": "4"},
                                                      {"messages": [{"role": "user", "content": "Name a primary color."}], "answer": "red"}]))
    router = tmp_path / "router.yaml"
    router.write_text("samples: 2\ntiers:\n  - {name: small, model: default}\n  - {name: large, model: default}\n")
    assert main(["route", "tune", str(router), "--dev", str(dev), "--max-new-tokens", "6", "--max-seq", "128"]) == 0
    cfg = load_router(router)
    assert cfg.tuned["items"] == 3 and cfg.tuned["met"]  # equal tiers: the small one alone reaches 98 %
    assert cfg.tuned["escalation"] == 0.0
