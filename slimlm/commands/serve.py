"""``slimlm serve MODEL [--model name=path …] [--router router.yaml]``: an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os


def cmd_serve(args: argparse.Namespace) -> None:
    from slimlm.serve.server import ServeConfig, check_bind, parse_models, serve

    key = args.api_key or os.environ.get("SLIMLM_API_KEY") or None
    check_bind(args.host, key)  # before anything slow
    cfg = ServeConfig(models=parse_models(args.model, args.models or []), host=args.host, port=args.port, api_key=key,
                      routers=args.router or [], max_queue=args.max_queue, max_batch=args.max_batch,
                      max_seq=args.max_seq, allow_pickle=args.allow_pickle)
    serve(cfg)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, cascade routers)")
    p.add_argument("model", nargs="?", default=None, help="`default`, a local HF folder, a .gguf file, or a slimlm artifact")
    p.add_argument("--model", dest="models", action="append", metavar="NAME=PATH", help="serve another model under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback requires --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default $SLIMLM_API_KEY)")
    p.add_argument("--router", action="append", metavar="ROUTER.yaml", help="serve a cascade router (see `slimlm route tune`)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting or running per model before 503")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together in one engine batch")
    p.add_argument("--max-seq", type=int, default=1024, help="context length per request (prompt + max_tokens)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints")
    p.set_defaults(func=cmd_serve)
