"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges, histograms.

Thread-safe: the engine workers update counters from their threads while the event loop renders.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")) for k, v in labels]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, dict[Labels, list[float]]] = {}  # bucket counts…, sum, count
        self._help: dict[str, tuple[str, str]] = {}
        self._gauges: dict[str, Callable[[], dict[Labels, float]]] = {}

    def counter(self, name: str, help_: str) -> None:
        self._help[name] = ("counter", help_)
        self._counters.setdefault(name, {})

    def histogram(self, name: str, help_: str) -> None:
        self._help[name] = ("histogram", help_)
        self._hists.setdefault(name, {})

    def gauge(self, name: str, help_: str, read: Callable[[], dict[Labels, float]]) -> None:
        """A gauge read at scrape time (queue depth is the queue's own number, never a copy)."""
        self._help[name] = ("gauge", help_)
        self._gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists[name].setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, b in enumerate(LATENCY_BUCKETS):
                if value <= b:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_) in self._help.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                if kind == "counter":
                    for key, v in self._counters[name].items():
                        lines.append(f"{name}{_labels(key)} {v:g}")
                elif kind == "histogram":
                    for key, h in self._hists[name].items():
                        for i, b in enumerate(LATENCY_BUCKETS):
                            lines.append(f"{name}_bucket{_labels(key + (('le', f'{b:g}'),))} {h[i]:g}")
                        lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {h[-1]:g}")
                        lines += [f"{name}_sum{_labels(key)} {h[-2]:.6g}", f"{name}_count{_labels(key)} {h[-1]:g}"]
                else:
                    for key, v in self._gauges[name]().items():
                        lines.append(f"{name}{_labels(key)} {v if math.isfinite(v) else 0:g}")
        return "\n".join(lines) + "\n"


def server_metrics() -> Metrics:
    """The server's metric families (names follow Prometheus conventions)."""
    m = Metrics()
    m.counter("slimlm_requests_total", "HTTP requests by endpoint, model and status code")
    m.counter("slimlm_prompt_tokens_total", "prompt tokens processed")
    m.counter("slimlm_generated_tokens_total", "tokens generated")
    m.counter("slimlm_route_decisions_total", "cascade requests by the tier that answered and the privacy action")
    m.histogram("slimlm_request_latency_seconds", "request latency, arrival to last byte")
    m.histogram("slimlm_time_to_first_token_seconds", "arrival to first generated token")
    m.histogram("slimlm_queue_wait_seconds", "time a request waited for an engine batch")
    m.counter("slimlm_batches_total", "engine batches run")
    m.counter("slimlm_batch_rows_total", "requests run inside engine batches (rows / batches = mean batch size)")
    return m
