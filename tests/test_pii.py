"""PII detection, masking and the privacy rule of the cascade (pure logic; real-server checks are in test_serve)."""

from __future__ import annotations

import json

from slimlm.route import pii
from slimlm.route.cascade import Cascade
from slimlm.route.config import RouterConfig
from slimlm.route.signals import Evidence
from slimlm.route.tiers import Need, Query, TierAnswer

EMAIL, PHONE, CARD = "jane.doe@example.com", "+44 20 7946 0958", "4111 1111 1111 1111"
IBAN, IP4, IP6 = "GB82 WEST 1234 5698 7654 32", "192.168.10.20", "2001:db8::ff00:42:8329"
TEXT = f"Write to {EMAIL} or call {PHONE}. Card {CARD}, IBAN {IBAN}, from {IP4} / {IP6}. We sold 1500 units in 2024."


def test_detects_each_kind_and_nothing_else():
    found = {(s.kind, TEXT[s.start:s.end]) for s in pii.find_pii(TEXT)}
    assert found == {("email", EMAIL), ("phone", PHONE), ("card", CARD), ("iban", IBAN), ("ipv4", IP4), ("ipv6", IP6)}


def test_checksums_reject_lookalikes():
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    assert pii.iban_ok("DE89370400440532013000") and not pii.iban_ok("DE89370400440532013001")
    kinds = {s.kind for s in pii.find_pii("order 4111 1111 1111 1112, IBAN DE89 3704 0044 0532 0130 01, host 999.10.1.1")}
    assert "card" not in kinds and "iban" not in kinds and "ipv4" not in kinds


def test_mask_restore_roundtrip():
    masked, table = pii.mask(TEXT, pii.find_pii(TEXT))
    for value in (EMAIL, PHONE, CARD, IBAN, IP4, IP6):
        assert value not in masked
    assert "[EMAIL_1]" in masked and "[CARD_1]" in masked
    assert pii.restore(masked, table) == TEXT


class RecordingTier:
    """A tier that records every query it is sent (stands in for a network endpoint's view)."""

    def __init__(self, name: str, remote: bool, conf: float, reply: str = "ok") -> None:
        self.name, self.remote, self.conf, self.reply, self.seen = name, remote, conf, reply, []

    def answer(self, query: Query, need: Need) -> TierAnswer:
        self.seen.append(query)
        text = self.reply if self.reply != "echo" else query.texts()[0]
        return TierAnswer(text, 3, 2, "stop", Evidence(answer=text, token_logprobs=[self.conf]))


def _cascade(tmp_path, mode: str, small_conf: float = -5.0):
    cfg = RouterConfig(signal="lp_min", privacy={"mode": mode}, log=str(tmp_path / "decisions.jsonl"),
                       tiers=[{"name": "small", "model": "default", "threshold": -1.0},
                              {"name": "cloud", "url": "http://127.0.0.1:9/v1"}])
    small, cloud = RecordingTier("small", False, small_conf), RecordingTier("cloud", True, 0.0, reply="echo")
    return Cascade(cfg, [small, cloud]), small, cloud


def test_mask_mode_sends_no_private_values_and_restores_them(tmp_path):
    cascade, _, cloud = _cascade(tmp_path, "mask")
    ans, dec = cascade.answer(Query(prompt=TEXT))
    sent = json.dumps([q.texts() for q in cloud.seen])
    for value in (EMAIL, PHONE, CARD, IBAN, IP4, IP6):
        assert value not in sent
    assert ans.text == TEXT  # the echoing remote tier's placeholders were restored
    assert dec.answered_by == "cloud" and dec.privacy_action == "masked"
    log = (tmp_path / "decisions.jsonl").read_text()
    for value in (EMAIL, PHONE, CARD, "jane", "1111"):
        assert value not in log
    assert json.loads(log)["pii_kinds"] == {"email": 1, "phone": 1, "card": 1, "iban": 1, "ipv4": 1, "ipv6": 1}


def test_local_mode_keeps_private_requests_local(tmp_path):
    cascade, small, cloud = _cascade(tmp_path, "local")
    ans, dec = cascade.answer(Query(messages=[{"role": "user", "content": f"my mail is {EMAIL}"}]))
    assert not cloud.seen and dec.answered_by == "small" and dec.privacy_action == "kept_local"
    ans, dec = cascade.answer(Query(prompt="What is the capital of France?"))  # nothing private: escalates
    assert len(cloud.seen) == 1 and dec.answered_by == "cloud" and dec.pii_kinds == {}
