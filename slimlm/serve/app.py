"""The OpenAI-compatible HTTP app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Every generation goes through a model's :class:`ModelWorker` (the batching queue over the engine);
a router model (``--router``) answers through the :class:`Cascade`, whose local tiers use the same
workers. The app never logs request bodies: the access log holds paths and status codes only, and
the router's decision log holds no text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from slimlm.errors import SlimlmError
from slimlm.route.cascade import Cascade
from slimlm.route.tiers import Query
from slimlm.serve import schema
from slimlm.serve.metrics import Metrics
from slimlm.serve.queue import ModelWorker, QueueFull
from slimlm.serve.schema import ApiError


@dataclass
class ServerState:
    workers: dict[str, ModelWorker]
    metrics: Metrics
    api_key: str | None = None
    routers: dict[str, Cascade] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def model_names(self) -> list[str]:
        return [*self.workers, *self.routers]


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _token_strings(worker: ModelWorker, tokens: list[int]) -> list[str]:
    tok = worker.engine.tokenizer
    return [tok.decode([t]) for t in tokens]


ENDPOINTS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class Guard:
    """Plain ASGI middleware: the API key check, request counts and latency measured to the *last* byte
    (so a stream counts its whole duration). Pure ASGI, so streaming and disconnects pass straight through."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"
        m, status = self.state.metrics, [500]
        if self.state.api_key and path != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.state.api_key}".encode()):
                m.inc("slimlm_requests_total", endpoint=path, status="401")
                err = ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)",
                               type_="authentication_error", code="invalid_api_key")
                return await _error(err)(scope, receive, send)

        async def tracked(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body" and not msg.get("more_body") and path.startswith("/v1/"):
                m.observe("slimlm_request_latency_seconds", time.perf_counter() - t0, endpoint=path)
            await send(msg)

        try:
            await self.app(scope, receive, tracked)
        finally:
            m.inc("slimlm_requests_total", endpoint=path, status=str(status[0]))


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="slimlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, state=state)
    m = state.metrics
    m.gauge("slimlm_queue_depth", "requests waiting or running per model",
            lambda: {(("model", n),): float(w.depth()) for n, w in state.workers.items()})

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": state.model_names(), "queue_depth": {n: w.depth() for n, w in state.workers.items()},
                "uptime_s": round(time.time() - state.started, 1)}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(m.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": int(state.started), "owned_by": "slimlm"}
                                           for n in state.model_names()]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _json_body(request)
        return await _generate(state, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _json_body(request)
        return await _generate(state, body, chat=True)

    return app


def _model(state: ServerState, body: dict[str, Any]) -> str:
    name = body.get("model")
    if name is None and len(state.model_names()) == 1:
        return state.model_names()[0]
    if name not in state.model_names():
        raise ApiError(404, f"model {name!r} is not served here (served: {', '.join(state.model_names())})",
                       param="model", code="model_not_found")
    return str(name)


async def _generate(state: ServerState, body: dict[str, Any], *, chat: bool) -> Response:
    name = _model(state, body)
    cfg = schema.gen_config(body, chat=chat)
    query = Query(messages=schema.messages_of(body), cfg=cfg) if chat else None
    if not chat:
        prompt = schema.prompt_of(body)
        query = Query(prompt=prompt if isinstance(prompt, str) else None, cfg=cfg)
    assert query is not None
    stream, want_lp = bool(body.get("stream")), bool(body.get("logprobs"))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    rid = schema.new_id("chatcmpl" if chat else "cmpl")
    if name in state.routers:
        return await _routed(state, state.routers[name], name, query, rid, chat=chat, stream=stream)
    worker = state.workers[name]
    ids = prompt if not chat and not isinstance(prompt, str) else worker.encode(query)
    limit = worker.engine.max_seq
    if not ids:
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
    if len(ids) + cfg.max_new_tokens > limit:
        raise ApiError(400, f"this model's context is {limit} tokens; the prompt has {len(ids)} and max_tokens asks for "
                       f"{cfg.max_new_tokens} more", param="messages" if chat else "prompt", code="context_length_exceeded")
    loop = asyncio.get_running_loop()
    deltas: asyncio.Queue[str | None] = asyncio.Queue()
    t0 = time.perf_counter()
    first: list[float] = []

    def on_delta(text: str) -> None:
        if not first:
            first.append(time.perf_counter() - t0)
        if stream:
            loop.call_soon_threadsafe(deltas.put_nowait, text)

    try:
        fut = worker.submit(ids, cfg, on_delta)
    except QueueFull:
        raise ApiError(503, f"model {name!r} has {worker.max_queue} requests queued; retry later",
                       type_="server_error", code="queue_full") from None
    afut = asyncio.wrap_future(fut)
    if stream:
        afut.add_done_callback(lambda _: deltas.put_nowait(None))
    m = state.metrics

    def account(res: Any) -> None:
        m.inc("slimlm_prompt_tokens_total", res.prompt_tokens, model=name)
        m.inc("slimlm_generated_tokens_total", len(res.tokens), model=name)
        if first:
            m.observe("slimlm_time_to_first_token_seconds", first[0], model=name)

    if not stream:
        try:
            res = await afut
        except SlimlmError as exc:
            raise ApiError(400, str(exc)) from None
        account(res)
        lp = None
        if want_lp:
            toks = _token_strings(worker, res.tokens)
            lp = schema.chat_logprobs(toks, res.logprobs) if chat else schema.completion_logprobs(toks, res.logprobs)
        return JSONResponse(schema.completion_response(rid, name, res.text, schema.finish_reason(res.finish_reason),
                                                       schema.usage(res.prompt_tokens, len(res.tokens)), chat=chat, logprobs=lp))

    async def events() -> AsyncIterator[str]:
        if chat:
            yield _sse(schema.chunk(rid, name, chat=True, role=True))
        while (text := await deltas.get()) is not None:
            yield _sse(schema.chunk(rid, name, chat=chat, text=text))
        try:
            res = await afut
        except SlimlmError as exc:
            yield _sse(ApiError(400, str(exc)).body())
            return
        account(res)
        yield _sse(schema.chunk(rid, name, chat=chat, finish=schema.finish_reason(res.finish_reason)))
        if include_usage:
            yield _sse(schema.chunk(rid, name, chat=chat, use=schema.usage(res.prompt_tokens, len(res.tokens))))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _routed(state: ServerState, cascade: Cascade, name: str, query: Query, rid: str, *, chat: bool,
                  stream: bool) -> Response:
    """A cascade answer: decided after the tiers ran, so a stream carries it as one chunk."""
    try:
        ans, dec = await asyncio.to_thread(cascade.answer, query)
    except QueueFull:
        raise ApiError(503, "a tier's queue is full; retry later", type_="server_error", code="queue_full") from None
    except SlimlmError as exc:
        raise ApiError(502 if "tier" in str(exc) else 400, str(exc), type_="server_error") from None
    m = state.metrics
    m.inc("slimlm_route_decisions_total", router=name, tier=dec.answered_by, privacy=dec.privacy_action)
    m.inc("slimlm_prompt_tokens_total", ans.prompt_tokens, model=name)
    m.inc("slimlm_generated_tokens_total", ans.completion_tokens, model=name)
    route = {k: v for k, v in asdict(dec).items() if k != "id"}
    use = schema.usage(ans.prompt_tokens, ans.completion_tokens)
    finish = schema.finish_reason(ans.finish_reason)
    if not stream:
        return JSONResponse(schema.completion_response(rid, name, ans.text, finish, use, chat=chat, extra={"slimlm_route": route}))

    async def events() -> AsyncIterator[str]:
        if chat:
            yield _sse(schema.chunk(rid, name, chat=True, role=True))
        yield _sse(schema.chunk(rid, name, chat=chat, text=ans.text))
        yield _sse(schema.chunk(rid, name, chat=chat, finish=finish))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
