"""``slimlm generate MODEL "prompt"`` and ``slimlm chat MODEL``: the engine from the command line.

Both are views of :class:`slimlm.runtime.sampling.GenConfig` and :class:`slimlm.runtime.engine.Engine`;
the flags map 1:1 to the Python API (``slimlm.generate(lm, prompt, temperature=…)``).
Text goes to stdout, speed figures to stderr (so ``slimlm generate … > out.txt`` keeps only text).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from slimlm.devices import DEVICE_HELP

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def gen_config(args: argparse.Namespace) -> Any:
    from slimlm.runtime.sampling import GenConfig

    cfg = GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=list(args.stop or []))
    cfg.validate()  # before the model loads: a bad flag fails in milliseconds
    return cfg


def make_engine(args: argparse.Namespace) -> Any:
    import torch

    from slimlm.devices import resolve_device
    from slimlm.models import load
    from slimlm.runtime.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device) if args.device else None  # one line for an absent or unknown device
    lm = load(args.model, allow_pickle=args.allow_pickle, device=device or "cpu")
    dtype = DTYPES[args.dtype]
    return Engine(lm, dtype=getattr(torch, dtype) if dtype else None, device=device, max_seq=args.max_seq,
                  compile=args.compile)


def _stats(res: Any) -> str:
    return (f"[{len(res.tokens)} tokens, {res.decode_tok_s:.1f} tok/s decode, "
            f"{res.prompt_tokens} prompt tokens in {res.ttft_s * 1000:.0f} ms, finish: {res.finish_reason}]")


def _run_one(engine: Any, ids: list[int], cfg: Any, stream: bool) -> Any:
    """Generate, printing the text (streamed as it comes, or at the end); returns the GenResult."""
    if not stream:
        res = engine.generate(ids, cfg)
        print(res.text, flush=True)
        return res
    from slimlm.runtime.decode import iter_generation

    results: list[Any] = []
    for _row, _tok, delta in iter_generation(engine, [ids], cfg, results):
        if delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
    print(flush=True)
    return results[0]


def cmd_generate(args: argparse.Namespace) -> None:
    cfg = gen_config(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = make_engine(args)
    res = _run_one(engine, engine.encode(prompt, chat=args.chat), cfg, args.stream)
    print(_stats(res), file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """Read user turns from stdin (one per line), keep the conversation, stream each reply with tok/s.

    ``/reset`` forgets the conversation, ``/exit`` (or end of input) quits.
    """
    cfg = gen_config(args)
    engine = make_engine(args)
    engine.encode_messages([{"role": "user", "content": "hi"}])  # fail early without a chat template
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print(f"slimlm chat: {engine.lm.info.source} ({'/reset' } clears, /exit quits)", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = messages[:1] if args.system else []
            print("[conversation cleared]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids = engine.encode_messages(messages)
        if len(ids) + 1 >= engine.max_seq:  # keep the newest turns that fit
            while len(messages) > 1 and len(engine.encode_messages(messages)) + 1 >= engine.max_seq:
                messages.pop(1 if args.system and len(messages) > 2 else 0)
            ids = engine.encode_messages(messages)
        print("assistant> ", end="", flush=True)
        res = _run_one(engine, ids, cfg, stream=True)
        messages.append({"role": "assistant", "content": res.text})
        print(_stats(res), file=sys.stderr)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    from slimlm.runtime.sampling import GenConfig

    d = GenConfig()
    p.add_argument("model", help="`default`, `gemma3-270m`, a local HF folder, a .gguf file, or a slimlm artifact")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--min-p", type=float, default=d.min_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    p.add_argument("--device", default=None, help=f"{DEVICE_HELP}; default: the CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                   help="activation dtype (auto: bf16 where int4/int8 kernels apply, else the model's)")
    p.add_argument("--max-seq", type=int, default=None, help="context held by the KV cache (default 2048)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the block step (experimental)")
    p.add_argument("--allow-pickle", action="store_true")


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt with the fast engine")
    add_generation_args(g)
    g.add_argument("prompt", help="the prompt (`-` reads it from stdin)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat (reads turns from stdin), shows tok/s")
    add_generation_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=cmd_chat)
