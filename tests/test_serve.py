"""The OpenAI-compatible server over real HTTP: a uvicorn server on 127.0.0.1 with the default model.

One server per module (model load and engine build once); answers are checked against the engine's
own sequential greedy output, so batching can never pass off wrong or interleaved text.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import pytest

from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.route.cascade import Cascade
from slimlm.route.config import RouterConfig, load_router
from slimlm.route.tiers import LocalTier, RemoteTier
from slimlm.runtime.engine import Engine
from slimlm.runtime.sampling import GenConfig
from slimlm.serve.app import create_app
from slimlm.serve.server import ServeConfig, ServerThread, build_cascade, build_state, check_bind

MAX_SEQ = 192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(lm, *, api_key: str | None = None, max_queue: int = 16, max_batch: int = 4):
    engine = Engine(lm, max_batch=max_batch, max_seq=MAX_SEQ)
    cfg = ServeConfig(models={"default": "default"}, api_key=api_key, max_queue=max_queue, max_batch=max_batch, max_seq=MAX_SEQ)
    state = build_state(cfg, preloaded={"default": engine})
    return state, ServerThread(create_app(state), "127.0.0.1", free_port()).start()


@pytest.fixture(scope="module")
def server(default_lm):
    state, srv = start(default_lm)
    yield state, srv
    srv.stop()
    for w in state.workers.values():
        w.close()


def reference(state, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """The engine's single-prompt greedy answer, run on the worker thread (not batched)."""
    cfg = GenConfig(max_new_tokens=max_tokens)
    return state.workers["default"].call(lambda eng: eng.generate(prompt, cfg, chat=chat).text)


def post(srv, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=120, **kw)


def sse(resp_lines) -> list:
    events = []
    for line in resp_lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_logprobs_usage(server):
    state, srv = server
    r = post(srv, "/v1/completions", {"model": "default", "prompt": "The capital of France is", "max_tokens": 6,
                                       "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["choices"][0]["text"]
    assert "Paris" in text and text == reference(state, "The capital of France is", 6)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == body["usage"]["completion_tokens"] == len(lp["tokens"]) > 0
    assert all(x <= 0 for x in lp["token_logprobs"]) and "".join(lp["tokens"]).strip() == text.strip()
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    models = httpx.get(srv.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["default"]


def test_chat_and_streaming_match(server):
    state, srv = server
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = post(srv, "/v1/chat/completions", {"messages": msgs, "max_tokens": 8, "temperature": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == reference(state, msgs[0]["content"], 8, chat=True)
    assert len(r.json()["choices"][0]["logprobs"]["content"]) == r.json()["usage"]["completion_tokens"]
    with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=120,
                      json={"messages": msgs, "max_tokens": 8, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse(s.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert streamed == msg["content"] and events[-3]["choices"][0]["finish_reason"] in ("stop", "length")
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=120,
                      json={"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0, "stream": True}) as s:
        events = sse(s.iter_lines())
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference(state, "One, two, three,", 6)


def test_errors_have_openai_shape(server):
    _, srv = server
    r = httpx.post(srv.url + "/v1/completions", content=b'{"prompt": "hi", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(srv, "/v1/completions", {"prompt": "word " * 400, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(srv, "/v1/completions", {"model": "gpt-9", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and "gpt-9" in r.json()["error"]["message"]
    for bad in ({"prompt": "hi", "n": 2}, {"prompt": 3}, {"prompt": "hi", "temperature": -1}, {"messages": []}):
        path = "/v1/chat/completions" if "messages" in bad else "/v1/completions"
        r = post(srv, path, bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad


def test_disconnect_mid_stream_leaves_server_healthy(server):
    state, srv = server
    with httpx.stream("POST", srv.url + "/v1/completions", timeout=120,
                      json={"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    r = post(srv, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(state, "The capital of France is", 4)


def test_concurrent_requests_get_their_own_text(server):
    state, srv = server
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def add(a, b):", "The color of the sky is"]
    before = state.metrics.value("slimlm_batches_total", model="default")
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        r = post(srv, "/v1/completions", {"prompt": prompts[i], "max_tokens": 8, "temperature": 0})
        out[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(len(prompts))] == [reference(state, p, 8) for p in prompts]
    assert state.metrics.value("slimlm_batches_total", model="default") - before < len(prompts)  # they shared batches
    text = httpx.get(srv.url + "/metrics").text
    for name in ("slimlm_requests_total", "slimlm_generated_tokens_total", "slimlm_request_latency_seconds_bucket",
                 "slimlm_queue_depth", "slimlm_time_to_first_token_seconds_count"):
        assert name in text


def test_auth_and_bind_rule(default_lm):
    with pytest.raises(SlimlmError, match="without an API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "k")
    check_bind("::1", None)
    assert main(["serve", "default", "--host", "0.0.0.0", "--port", str(free_port())]) == 2  # refuses before loading
    state, srv = start(default_lm, api_key="s3cret", max_queue=1, max_batch=1)
    try:
        assert httpx.get(srv.url + "/health").status_code == 200
        r = post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer s3cret"}
        assert post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers=auth).status_code == 200
        # a full queue answers 503: one long request holds the only slot
        slow = threading.Thread(target=post, args=(srv, "/v1/completions", {"prompt": "Once", "max_tokens": 30}),
                                kwargs={"headers": auth})
        slow.start()
        for _ in range(200):
            if state.workers["default"].depth():
                break
            threading.Event().wait(0.01)
        r = post(srv, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, headers=auth)
        slow.join()
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    finally:
        srv.stop()
        state.workers["default"].close()


PRIVATE = ("jane.doe@example.com", "+1 415 555 0132", "4111 1111 1111 1111")


def test_cascade_with_remote_slimlm_server(server, default_lm, tmp_path, capfd):
    """Tier 1: the local worker; tier 2: a second slimlm server on loopback reached over HTTP."""
    state, srv = server
    rstate, remote = start(default_lm)
    sent: list[bytes] = []
    client = httpx.Client(timeout=120, event_hooks={"request": [lambda req: sent.append(req.read())]})
    try:
        def cascade(threshold: float, mode: str = "mask") -> Cascade:
            cfg = RouterConfig(signal="lp_mean", log=str(tmp_path / "decisions.jsonl"), privacy={"mode": mode},
                               tiers=[{"name": "small", "model": "default", "threshold": threshold},
                                      {"name": "cloud", "url": remote.url + "/v1"}])
            return Cascade(cfg, [LocalTier("small", state.workers["default"]),
                                 RemoteTier("cloud", remote.url + "/v1", "default", client=client)])

        router_yaml = tmp_path / "router.yaml"
        router_yaml.write_text(f"signal: lp_mean\nlog: {tmp_path / 'decisions.jsonl'}\ntiers:\n"
                               f"  - {{name: small, model: default, threshold: 1.0e9}}\n  - {{name: cloud, url: '{remote.url}/v1'}}\n")
        # as `slimlm serve --router` builds it: the local tier reuses the served model's worker
        state.routers["router"] = build_cascade(load_router(router_yaml), state, ServeConfig(models={"default": "default"}))
        assert state.routers["router"].tiers[0].backend is state.workers["default"]
        r = post(srv, "/v1/completions", {"model": "router", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        route = r.json()["slimlm_route"]
        assert route["answered_by"] == "cloud" and route["steps"][0]["escalate"] is True
        assert r.json()["choices"][0]["text"] == reference(rstate, "The capital of France is", 5)
        conf = route["steps"][0]["confidence"]
        for threshold, who in ((conf - 1e-6, "small"), (conf + 1e-6, "cloud")):  # decisions follow the threshold
            state.routers["router"] = cascade(threshold)
            r = post(srv, "/v1/completions", {"model": "router", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0})
            assert r.json()["slimlm_route"]["answered_by"] == who
        assert 'slimlm_route_decisions_total{privacy="none",router="router",tier="cloud"} 2' in httpx.get(srv.url + "/metrics").text

        prompt = f"Email {PRIVATE[0]}, call {PRIVATE[1]}, card {PRIVATE[2]}. Summarise:"
        sent.clear()
        state.routers["router"] = cascade(1e9)
        r = post(srv, "/v1/chat/completions", {"model": "router", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4})
        assert r.json()["slimlm_route"]["privacy_action"] == "masked" and sent
        state.routers["router"] = cascade(1e9, mode="local")
        r = post(srv, "/v1/completions", {"model": "router", "prompt": prompt, "max_tokens": 4})
        assert r.json()["slimlm_route"]["answered_by"] == "small" and r.json()["slimlm_route"]["privacy_action"] == "kept_local"
        logs = (tmp_path / "decisions.jsonl").read_text() + "".join(capfd.readouterr())
        for value in PRIVATE:
            assert all(value.encode() not in body for body in sent)
            assert value not in logs
        assert b"[EMAIL_1]" in sent[0] and b"[CARD_1]" in sent[0]
    finally:
        state.routers.pop("router", None)
        client.close()
        remote.stop()
        rstate.workers["default"].close()
