"""The OpenAI wire format: request fields → :class:`GenConfig`, results → response and SSE chunk JSON.

Only what slimlm can honour is accepted; anything else (``n`` > 1, ``echo``, ``best_of``, top-k
alternatives) is refused with a 400 naming the field instead of being silently ignored. Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.runtime.sampling import GenConfig


class ApiError(Exception):
    """An HTTP error in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _num(body: dict[str, Any], key: str, default: float, kind: type = float) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise ApiError(400, f"`{key}` must be {'an integer' if kind is int else 'a number'}, got {v!r}", param=key)
    return kind(v)


def gen_config(body: dict[str, Any], *, chat: bool) -> GenConfig:
    """Decoding settings of a request (OpenAI defaults: temperature 1, max_tokens 16 for completions)."""
    for key, bad in (("n", lambda v: v not in (None, 1)), ("best_of", lambda v: v not in (None, 1)),
                     ("echo", lambda v: bool(v)), ("suffix", lambda v: v is not None)):
        if bad(body.get(key)):
            raise ApiError(400, f"`{key}` is not supported by slimlm serve", param=key)
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "`stop` must be a string or a list of strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "`seed` must be an integer", param="seed")
    cfg = GenConfig(max_new_tokens=_num(body, max_key, 256 if chat else 16, int),
                    temperature=_num(body, "temperature", 1.0), top_p=_num(body, "top_p", 1.0),
                    top_k=_num(body, "top_k", 0, int), min_p=_num(body, "min_p", 0.0),
                    repetition_penalty=_num(body, "repetition_penalty", 1.0), seed=seed, stop=list(stop))
    try:
        cfg.validate()
    except SlimlmError as exc:
        raise ApiError(400, str(exc)) from None
    return cfg


def prompt_of(body: dict[str, Any]) -> str | list[int]:
    """``prompt`` of /v1/completions: a string, a one-element list of strings, or token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
        return p
    raise ApiError(400, "`prompt` must be a string (or a single-element list, or a list of token ids)", param="prompt")


def messages_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] needs a string `role`", param="messages")
        content = m.get("content", "")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)]}


def completion_response(rid: str, model: str, text: str, finish: str, use: dict[str, int], *, chat: bool,
                        logprobs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice], "usage": use}
    return {**out, **(extra or {})}


def chunk(rid: str, model: str, *, chat: bool, text: str | None = None, finish: str | None = None,
          role: bool = False, use: dict[str, int] | None = None) -> dict[str, Any]:
    """One SSE event's JSON (``use`` alone: the final usage chunk with no choices)."""
    base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()), "model": model}
    if use is not None:
        return {**base, "choices": [], "usage": use}
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}


def finish_reason(engine_reason: str) -> str:
    """The engine's "eos" is OpenAI's "stop"."""
    return "length" if engine_reason == "length" else "stop"
