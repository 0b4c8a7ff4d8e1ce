"""Assemble a server: models → engines → batching workers (+ routers) → the app, behind uvicorn.

The bind rule is checked before any model loads: a non-loopback address without an API key is
refused, so a half-configured server never becomes reachable from the network.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.serve.metrics import server_metrics
from slimlm.serve.queue import ModelWorker


@dataclass
class ServeConfig:
    """What `slimlm serve` was asked for (the CLI flags map 1:1)."""

    models: dict[str, str]  # served name → source (``default``, a folder, a .gguf, an artifact)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    routers: list[str] = field(default_factory=list)  # router.yaml paths
    max_queue: int = 64
    max_batch: int = 8
    max_seq: int = 1024
    allow_pickle: bool = False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise SlimlmError(f"refusing to serve on {host} without an API key",
                          "pass --api-key KEY (or set SLIMLM_API_KEY), or bind 127.0.0.1")


def parse_models(main: str | None, extra: list[str]) -> dict[str, str]:
    """``MODEL`` is served under its own name; each ``--model name=path`` adds one more."""
    out: dict[str, str] = {}
    if main:
        out[Path(main).name if os.sep in main else main] = main
    for spec in extra:
        name, sep, src = spec.partition("=")
        if not sep or not name or not src:
            raise SlimlmError(f"--model {spec!r} is not name=path", "write e.g. --model large=gemma3-270m")
        if name in out:
            raise SlimlmError(f"model name {name!r} is given twice", "give every served model its own name")
        out[name] = src
    if not out:
        raise SlimlmError("no model to serve", "pass MODEL or --model name=path")
    return out


def make_worker(name: str, source: str, cfg: ServeConfig, metrics: Any) -> ModelWorker:
    from slimlm.models import load
    from slimlm.runtime.engine import Engine

    lm = load(source, allow_pickle=cfg.allow_pickle)
    engine = Engine(lm, max_batch=cfg.max_batch, max_seq=cfg.max_seq)
    return ModelWorker(name, engine, metrics, max_queue=cfg.max_queue, max_batch=cfg.max_batch)


def build_state(cfg: ServeConfig, *, preloaded: dict[str, Any] | None = None) -> Any:
    """Workers for every model and every router tier; ``preloaded`` maps names to ready engines (tests)."""
    from slimlm.route.config import load_router
    from slimlm.serve.app import ServerState

    check_bind(cfg.host, cfg.api_key)
    routers = [load_router(p) for p in cfg.routers]  # bad router files fail before the slow loads
    for r in routers:
        r.thresholds()
    metrics = server_metrics()
    workers: dict[str, ModelWorker] = {}
    for name, source in cfg.models.items():
        if preloaded and name in preloaded:
            workers[name] = ModelWorker(name, preloaded[name], metrics, max_queue=cfg.max_queue, max_batch=cfg.max_batch)
        else:
            workers[name] = make_worker(name, source, cfg, metrics)
    state = ServerState(workers=workers, metrics=metrics, api_key=cfg.api_key)
    for rcfg in routers:
        if rcfg.name in state.model_names():
            raise SlimlmError(f"router name {rcfg.name!r} is also a model name", "rename the router (`name:` in its file)")
        state.routers[rcfg.name] = build_cascade(rcfg, state, cfg)
    return state


def build_cascade(rcfg: Any, state: Any, cfg: ServeConfig) -> Any:
    """Local tiers reuse a served model of the same source (or name), else get their own worker."""
    from slimlm.route.cascade import Cascade
    from slimlm.route.tiers import LocalTier, RemoteTier

    tiers = []
    for t in rcfg.tiers:
        if t.remote:
            tiers.append(RemoteTier(t.name, t.url, t.remote_model, t.api_key(), t.timeout_s))
            continue
        match = next((n for n, src in cfg.models.items() if t.model in (n, src)), None)
        if match is None:
            match = f"{rcfg.name}/{t.name}"
            cfg.models[match] = t.model
            state.workers[match] = make_worker(match, t.model, cfg, state.metrics)
        tiers.append(LocalTier(t.name, state.workers[match]))
    return Cascade(rcfg, tiers)


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks): ``start()`` waits until it accepts requests."""

    def __init__(self, app: Any, host: str, port: int, log_level: str = "warning") -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://{host}:{port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        import time

        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > timeout or not self.thread.is_alive():
                raise SlimlmError("the server did not start", "is the port free?")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(cfg: ServeConfig) -> None:
    """Blocking: build everything, then run uvicorn until interrupted."""
    import uvicorn

    from slimlm.serve.app import create_app

    state = build_state(cfg)
    names = ", ".join(state.model_names())
    print(f"slimlm serve: {names} on http://{cfg.host}:{cfg.port}/v1 (auth {'on' if cfg.api_key else 'off'})", flush=True)
    uvicorn.run(create_app(state), host=cfg.host, port=cfg.port, log_level="info")
