"""The server under load: 1, 8 and 32 concurrent streaming clients on loopback, default model.

Each client runs a bounded loop of streaming /v1/completions requests (greedy, fixed length, so
every answer is checkable) over its own keep-alive connection (as load generators do: a fresh
``httpx`` client per request costs tens of ms of GIL-bound set-up, which spreads the arrivals of
clients that start together) and stops by itself. Per concurrency level: p50/p99 latency, p50/p99 time
to first token, aggregate generated tokens/s over the level's wall time, mean engine batch size, and
the count of failed or corrupted responses — a response is corrupted when its streamed text differs
from the same prompt's answer at concurrency 1 (sequential, unbatched).

    flock /tmp/slimlm-cpu.lock .venv/bin/python benchmarks/serve.py
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch

import slimlm
from slimlm.runtime.engine import Engine
from slimlm.serve.app import create_app
from slimlm.serve.server import ServeConfig, ServerThread, build_state

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The three primary colors are",
           "def fibonacci(n):", "The best way to learn a language is", "Water boils at", "My favourite season is",
           "The history of the Roman Empire"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, text, tokens, ok = None, [], 0, True
    try:
        with http.stream("POST", url + "/v1/completions", timeout=600,
                          json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            ok = r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                for ch in ev.get("choices", []):
                    if ch.get("text"):
                        ttft = ttft or time.perf_counter() - t0
                        text.append(ch["text"])
    except httpx.HTTPError:
        ok = False
    return {"prompt": prompt, "ok": ok, "text": "".join(text), "tokens": tokens, "latency_s": time.perf_counter() - t0,
            "ttft_s": ttft if ttft is not None else float("nan")}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def level(url: str, clients: int, per_client: int, max_tokens: int) -> list[dict]:
    out: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client() as http:  # one keep-alive connection per client, as load generators use
            for k in range(per_client):
                r = one_request(http, url, PROMPTS[(c + k * clients) % len(PROMPTS)], max_tokens)
                with lock:
                    out.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (≥ clients; 1 client runs len(PROMPTS))")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = slimlm.load("default")
    engine = Engine(lm, max_batch=args.max_batch, max_seq=256)
    cfg = ServeConfig(models={"default": "default"}, max_queue=256, max_batch=args.max_batch, max_seq=256)
    state = build_state(cfg, preloaded={"default": engine})
    srv = ServerThread(create_app(state), "127.0.0.1", free_port()).start()
    m = state.metrics
    reference: dict[str, str] = {}
    result = {"model": "default (SmolLM2-135M)", "max_tokens": args.max_tokens, "max_batch": args.max_batch,
              "engine_dtype": str(engine.dtype), "torch_threads": torch.get_num_threads(), "levels": {}}
    try:
        with httpx.Client() as http:
            one_request(http, srv.url, PROMPTS[0], 4)  # warm-up (first-call allocations), not measured
        for clients in [int(x) for x in args.levels.split(",")]:
            per_client = len(PROMPTS) if clients == 1 else max(1, args.requests // clients)
            b0, r0 = m.value("slimlm_batches_total", model="default"), m.value("slimlm_batch_rows_total", model="default")
            t0 = time.perf_counter()
            rs = level(srv.url, clients, per_client, args.max_tokens)
            wall = time.perf_counter() - t0
            if clients == 1:
                reference = {r["prompt"]: r["text"] for r in rs if r["ok"]}
            failed = sum(not r["ok"] for r in rs)
            corrupted = sum(r["ok"] and r["prompt"] in reference and r["text"] != reference[r["prompt"]] for r in rs)
            batches = m.value("slimlm_batches_total", model="default") - b0
            rows = m.value("slimlm_batch_rows_total", model="default") - r0
            tokens = sum(r["tokens"] for r in rs)
            lat, ttft = [r["latency_s"] for r in rs], [r["ttft_s"] for r in rs]
            result["levels"][str(clients)] = {
                "clients": clients, "requests": len(rs), "failed": failed, "corrupted": corrupted, "wall_s": wall,
                "tokens": tokens, "aggregate_tok_s": tokens / wall, "latency_p50_s": statistics.median(lat),
                "latency_p99_s": pct(lat, 0.99), "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
                "mean_batch": rows / batches if batches else 0.0}
            print(json.dumps(result["levels"][str(clients)]), flush=True)
    finally:
        srv.stop()
        state.workers["default"].close()
    lv = result["levels"]
    if "1" in lv and "8" in lv:
        result["speedup_8_vs_1"] = lv["8"]["aggregate_tok_s"] / lv["1"]["aggregate_tok_s"]
    if "1" in lv and "32" in lv:
        result["speedup_32_vs_1"] = lv["32"]["aggregate_tok_s"] / lv["1"]["aggregate_tok_s"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("| clients | requests | failed | corrupted | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | aggregate tok/s | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in lv.values():
        print(f"| {v['clients']} | {v['requests']} | {v['failed']} | {v['corrupted']} | {v['latency_p50_s']:.2f} | {v['latency_p99_s']:.2f} | "
              f"{v['ttft_p50_s']:.2f} | {v['ttft_p99_s']:.2f} | {v['aggregate_tok_s']:.1f} | {v['mean_batch']:.1f} |")
    print(f"speed-up 8 vs 1: {result.get('speedup_8_vs_1', float('nan')):.2f}x → {out}")


if __name__ == "__main__":
    main()
