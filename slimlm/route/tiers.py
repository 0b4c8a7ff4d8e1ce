"""The models of a cascade: a local slimlm engine or a remote OpenAI-compatible endpoint.

Each tier answers a :class:`Query` with its text and the :class:`Evidence` its confidence signal
needs. Local tiers generate through the engine (via a :class:`Backend`: the engine itself, or the
server's batching queue, so cascade traffic is batched with everything else); remote tiers are
called with httpx and asked for token log-probs.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, TypeVar

import torch

from slimlm.errors import SlimlmError
from slimlm.route.signals import Evidence
from slimlm.runtime.sampling import GenConfig

T = TypeVar("T")
Messages = list[dict[str, Any]]


@dataclass
class Query:
    """One request: a plain ``prompt`` or chat ``messages``, and how to decode."""

    prompt: str | None = None
    messages: Messages | None = None
    cfg: GenConfig = field(default_factory=GenConfig)

    def texts(self) -> list[str]:
        """Every piece of user-supplied text (what privacy detection must see)."""
        return [self.prompt] if self.prompt is not None else [str(m.get("content", "")) for m in self.messages or []]

    def with_texts(self, texts: list[str]) -> "Query":
        if self.prompt is not None:
            return replace(self, prompt=texts[0])
        return replace(self, messages=[{**m, "content": t} for m, t in zip(self.messages or [], texts)])


@dataclass
class TierAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    evidence: Evidence


@dataclass
class Need:
    """Which evidence the signal needs beyond token log-probs."""

    entropies: bool = False
    samples: int = 0
    temperature: float = 0.8


class Backend(Protocol):
    """What a local tier needs from an engine; the server's queue implements the same three calls."""

    def encode(self, query: Query) -> list[int]: ...
    def generate(self, prompts: list[list[int]], cfg: GenConfig) -> list[Any]: ...
    def call(self, fn: Callable[[Any], T]) -> T: ...


def encode_query(engine: Any, query: Query) -> list[int]:
    """Token ids of a query: the chat template for messages, the engine's plain encoding otherwise."""
    if query.prompt is not None:
        return engine.encode(query.prompt)
    return engine.encode_messages(query.messages or [])


class DirectBackend:
    """The engine itself, serialised by a lock (the CLI and benchmarks; the server uses its queue)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._lock = threading.Lock()

    def encode(self, query: Query) -> list[int]:
        return encode_query(self.engine, query)

    def generate(self, prompts: list[list[int]], cfg: GenConfig) -> list[Any]:
        with self._lock:
            return list(self.engine.generate(prompts, cfg))

    def call(self, fn: Callable[[Any], T]) -> T:
        with self._lock:
            return fn(self.engine)


@torch.no_grad()
def answer_entropies(engine: Any, prompt: list[int], answer: list[int]) -> list[float]:
    """Entropy (nats) of the model's next-token distribution at each answer token (one prefill)."""
    if not answer:
        return []
    engine.reset(1)
    ids = torch.tensor([prompt + answer[:-1]], device=engine.device)
    logits = engine.forward(ids)[0, len(prompt) - 1 :]  # (len(answer), V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (-(logp.exp() * logp).sum(-1)).tolist()


def normalise(text: str) -> str:
    from slimlm.eval.tasks.run import normalize_answer

    return normalize_answer(text)


class LocalTier:
    remote = False

    def __init__(self, name: str, backend: Backend) -> None:
        self.name = name
        self.backend = backend

    def answer(self, query: Query, need: Need) -> TierAnswer:
        ids = self.backend.encode(query)
        res = self.backend.generate([ids], query.cfg)[0]
        ev = Evidence(answer=normalise(res.text), token_logprobs=list(res.logprobs))
        if need.entropies:
            ev.token_entropies = self.backend.call(lambda eng: answer_entropies(eng, ids, list(res.tokens)))
        if need.samples:
            seed = query.cfg.seed if query.cfg.seed is not None else 0
            cfg = replace(query.cfg, temperature=need.temperature, seed=seed + 1)
            ev.samples = [normalise(r.text) for r in self.backend.generate([ids] * need.samples, cfg)]
        return TierAnswer(res.text, res.prompt_tokens, len(res.tokens), res.finish_reason, ev)


class RemoteTier:
    """An OpenAI-compatible endpoint (``url`` is its base, e.g. ``http://host:8000/v1``)."""

    remote = True

    def __init__(self, name: str, url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0,
                 client: Any | None = None) -> None:
        import httpx

        self.name = name
        self.url = url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s, headers=headers)
        if client is not None and api_key:
            self.client.headers.update(headers)

    def answer(self, query: Query, need: Need) -> TierAnswer:
        cfg = query.cfg
        body: dict[str, Any] = {"model": self.model, "max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                                "top_p": cfg.top_p, "stop": cfg.stop or None}
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        if query.prompt is not None:
            path, body["prompt"], body["logprobs"] = "/completions", query.prompt, 1
        else:
            path, body["messages"], body["logprobs"] = "/chat/completions", query.messages, True
        try:
            r = self.client.post(self.url + path, json=body)
        except Exception as exc:  # httpx.HTTPError and socket errors: name the tier, not a traceback
            raise SlimlmError(f"tier {self.name!r}: {self.url} unreachable ({type(exc).__name__})",
                              "check the endpoint URL and that the server is running") from None
        if r.status_code != 200:
            raise SlimlmError(f"tier {self.name!r}: {self.url}{path} answered {r.status_code}: {r.text[:200]}",
                              "check the tier's url, remote_model and api_key_env")
        data = r.json()
        choice = data["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        lp = choice.get("logprobs") or {}
        if "content" in lp:  # chat shape: [{"token", "logprob"}, …]
            token_lps = [float(t["logprob"]) for t in lp["content"] or []]
        else:
            token_lps = [float(x) for x in lp.get("token_logprobs") or [] if x is not None and math.isfinite(x)]
        usage = data.get("usage", {})
        ev = Evidence(answer=normalise(text), token_logprobs=token_lps)
        return TierAnswer(text, int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", len(token_lps))),
                          choice.get("finish_reason") or "stop", ev)
