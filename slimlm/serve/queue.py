"""The batching queue: one worker thread per served model groups waiting requests into engine batches.

Requests wait in a bounded FIFO (full → :class:`QueueFull`, answered 503). The worker takes the
oldest request and gathers every waiting request with the *same* decoding config that fits the
context beside the others (up to ``max_batch``; a short gather window lets concurrent arrivals
meet, and when a batch of b rows ends with w requests already waiting, the next batch waits up to
``refill_s`` for w + b of them, since the clients just answered tend to ask again at once: without
that, requests that arrived during a batch form the next one alone and two half-size groups alternate
for good; 50 ms was too short for 8 streaming clients on loopback, 300 ms merges them — see
docs/serving.md). The batch runs through ``iter_generation`` — the loop behind
``Engine.generate(list_of_prompts, cfg)``, which also says which row each text delta belongs to — so
each row's deltas go only to its own request and outputs are never interleaved; batched greedy rows
equal their sequential answers (the engine's contract). Other engine work (an entropy prefill for
the router) runs as a ``call`` job on the same thread, because an engine is not thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from slimlm.route.tiers import Query, encode_query
from slimlm.runtime.sampling import GenConfig
from slimlm.serve.metrics import Metrics

T = TypeVar("T")


class QueueFull(Exception):
    """The model's queue holds ``max_queue`` requests already."""


@dataclass
class Job:
    ids: list[int] | None
    cfg: GenConfig | None
    on_delta: Callable[[str], None] | None = None
    fn: Callable[[Any], Any] | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0


class ModelWorker:
    """Owns one engine; implements the router's ``Backend`` (encode / generate / call)."""

    def __init__(self, name: str, engine: Any, metrics: Metrics, *, max_queue: int = 64, max_batch: int = 8,
                 gather_s: float = 0.01, refill_s: float = 0.3) -> None:
        self.name = name
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch = min(max_batch, int(getattr(engine, "max_batch", max_batch)))  # the engine's cache rows
        self.gather_s = gather_s
        self.refill_s = refill_s
        self._expect = 1  # requests the next batch waits (≤ refill_s) for: those waiting + those just answered
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"slimlm-engine-{name}", daemon=True)
        self._thread.start()

    # --- submitting ------------------------------------------------------------------------------

    def depth(self) -> int:
        """Requests waiting or running."""
        with self._cv:
            return len(self._jobs) + self._running

    def _put(self, job: Job) -> Future:
        with self._cv:
            if len(self._jobs) + self._running >= self.max_queue:
                raise QueueFull(self.name)
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def submit(self, ids: list[int], cfg: GenConfig, on_delta: Callable[[str], None] | None = None) -> Future:
        """Queue one generation; the future resolves to its ``GenResult``."""
        return self._put(Job(ids=ids, cfg=cfg, on_delta=on_delta))

    def encode(self, query: Query) -> list[int]:
        return encode_query(self.engine, query)

    def generate(self, prompts: list[list[int]], cfg: GenConfig) -> list[Any]:
        """Blocking: queue every prompt (they will share a batch) and wait for all of them."""
        futures = [self.submit(p, cfg) for p in prompts]
        return [f.result() for f in futures]

    def call(self, fn: Callable[[Any], T]) -> T:
        return self._put(Job(ids=None, cfg=None, fn=fn)).result()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # --- the worker --------------------------------------------------------------------------------

    def _take_batch(self) -> list[Job]:
        with self._cv:
            while not self._jobs and not self._stop:
                self._cv.wait()
            if self._stop:
                return []
            first = self._jobs[0]
        if first.fn is None and self.gather_s > 0:
            time.sleep(self.gather_s)  # let requests that arrive together share the batch
        with self._cv:
            # Clients whose answers just finished usually ask again at once: wait briefly for them to
            # join the requests that queued during the last batch, so the groups merge.
            deadline = time.perf_counter() + self.refill_s
            while first.fn is None and len(self._jobs) < self._expect and not self._stop:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cv.wait(left)
            first = self._jobs.popleft()
            batch = [first]
            if first.fn is None:
                keep: deque[Job] = deque()
                longest, limit = len(first.ids or []), self.engine.max_seq - first.cfg.max_new_tokens  # type: ignore[union-attr]
                while self._jobs and len(batch) < self.max_batch:
                    job = self._jobs.popleft()
                    # rows decode in lock-step, so the longest prompt bounds every row's room to grow
                    fits = job.fn is None and job.cfg == first.cfg and max(longest, len(job.ids or [])) <= limit
                    if fits:
                        longest = max(longest, len(job.ids or []))
                    (batch if fits else keep).append(job)
                self._jobs.extendleft(reversed(keep))
            self._running = len(batch)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            now = time.perf_counter()
            for job in batch:
                job.started = now
                self.metrics.observe("slimlm_queue_wait_seconds", now - job.enqueued, model=self.name)
            try:
                if batch[0].fn is not None:
                    batch[0].future.set_result(batch[0].fn(self.engine))
                else:
                    self._generate(batch)
            except BaseException as exc:  # noqa: BLE001 — every waiter must hear about the failure
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._cv:
                    self._running = 0
                    if batch[0].fn is None:
                        self._expect = min(len(self._jobs) + len(batch), self.max_batch)

    def _generate(self, batch: list[Job]) -> None:
        from slimlm.runtime.decode import iter_generation

        self.metrics.inc("slimlm_batches_total", model=self.name)
        self.metrics.inc("slimlm_batch_rows_total", len(batch), model=self.name)
        results: list[Any] = []
        for row, _token, delta in iter_generation(self.engine, [j.ids for j in batch], batch[0].cfg, results):  # type: ignore[misc]
            cb = batch[row].on_delta
            if cb is not None and delta:
                cb(delta)
        for job, res in zip(batch, results):
            job.future.set_result(res)
