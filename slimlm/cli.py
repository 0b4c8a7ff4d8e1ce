"""Command line: every command is a thin view of the Python API and its config objects.

Core commands live here; each module of :mod:`slimlm.commands` adds its own subcommand through
``add_parser(subparsers)`` (set ``func`` with ``set_defaults``), so features plug in without
editing this file.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import pkgutil
import sys
import traceback
from typing import Any, Sequence

from slimlm import commands
from slimlm.config import int_at_least
from slimlm.devices import add_device_args
from slimlm.errors import SlimlmError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (not the usage block) and exits 2 like every bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} — see `{self.prog} --help`\n")


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def print_table(rows: list[dict[str, Any]]) -> None:
    """Terminal table: one line per model with its quality and efficiency figures."""
    header = f"{'model':<28} {'ppl':>8} {'params':>12} {'disk':>10} {'weights RAM':>12} {'TTFT s':>7} {'prefill t/s':>11} {'decode t/s':>10}"
    print(header)
    print("-" * len(header))
    by_model: dict[str, dict[str, Any]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {}).update(r)
    for name, r in by_model.items():
        print(f"{name[-28:]:<28} {r.get('perplexity', float('nan')):>8.3f} {r.get('params', 0):>12,} "
              f"{_fmt_bytes(r.get('bytes_on_disk')):>10} {_fmt_bytes(r.get('weight_bytes_in_memory')):>12} "
              f"{r.get('ttft_s', float('nan')):>7.3f} {r.get('prefill_tok_s', float('nan')):>11.1f} "
              f"{r.get('decode_tok_s', float('nan')):>10.2f}")


def cmd_eval(args: argparse.Namespace) -> None:
    from slimlm.eval.run import evaluate
    from slimlm.models import load
    from slimlm.results import append_rows

    lm = load(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    rows = evaluate(lm, data=args.data, window=args.window, max_tokens=args.max_tokens or None,
                    speed=not args.no_speed, progress=not args.json)
    path = append_rows(rows, args.results)
    if args.json:
        for r in rows:
            print(json.dumps(r, default=str))
    else:
        print_table(rows)
        print(f"\nresults appended to {path}")


def cmd_compress(args: argparse.Namespace) -> None:
    from slimlm.artifact import check_output
    from slimlm.compress import compress
    from slimlm.models import load
    from slimlm.recipe import Recipe

    recipe = Recipe.load(args.recipe)  # validate before the (slow) model load
    check_output(args.out, overwrite=args.overwrite)
    lm = load(args.model, allow_pickle=args.allow_pickle, device=args.device, dtype=args.dtype)
    res = compress(lm, recipe, args.out, overwrite=args.overwrite)
    for r in res.reports:
        worst = max(r.layer_errors.items(), key=lambda kv: kv[1], default=("-", 0.0))
        print(f"{r.method}: {len(r.layer_errors)} layers in {r.seconds:.1f}s, worst relative error {worst[1]:.4f} ({worst[0]})")
    print(f"artifact written to {res.out}")


def cmd_methods(args: argparse.Namespace) -> None:
    from slimlm.methods import METHODS

    for name in METHODS.names():
        cfg = METHODS.get(name).config
        opts = ", ".join(f"{k}={f.default!r}" for k, f in cfg.model_fields.items())
        print(f"{name}: {opts}")


def cmd_demo(args: argparse.Namespace) -> None:
    from slimlm.demo import run_demo

    run_demo(out=args.out, data=args.data, max_tokens=args.max_tokens, results=args.results, show=print_table)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="slimlm", description="Compress language models and measure what it costs and buys.")
    p.add_argument("--debug", action="store_true", help="on an error, also print the underlying traceback")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="`default`, a local HF folder, a .gguf file, or a slimlm artifact")
        sp.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code from the file)")
        add_device_args(sp)

    e = sub.add_parser("eval", help="perplexity and efficiency of a model or artifact")
    model_args(e)
    e.add_argument("--data", default="auto", help="auto | shakespeare | wikitext2 | path to .txt file or folder")
    e.add_argument("--window", type=int_at_least(2), default=512, help="perplexity window in tokens (≤ the model's context)")
    e.add_argument("--max-tokens", type=int_at_least(0), default=16384, help="evaluate the first N tokens (0 = all)")
    e.add_argument("--no-speed", action="store_true", help="skip the latency/throughput measurement")
    e.add_argument("--json", action="store_true", help="print one JSON object per line")
    e.add_argument("--results", default=None, help="results file to append to (default slimlm-results/results.jsonl)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compress", help="apply a YAML recipe and write an artifact folder")
    model_args(c)
    c.add_argument("--recipe", required=True, help="YAML recipe file (see recipes/)")
    c.add_argument("--out", required=True, help="artifact folder to create")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    c.set_defaults(func=cmd_compress)

    m = sub.add_parser("methods", help="list registered compression methods and their options")
    m.set_defaults(func=cmd_methods)

    d = sub.add_parser("demo", help="the main job: default model → RTN-8 and RTN-4 → before/after table")
    d.add_argument("--out", default="slimlm-out/demo", help="where the artifacts go")
    d.add_argument("--data", default="auto", help="evaluation text (auto = WikiText-2 if present, else Shakespeare)")
    d.add_argument("--max-tokens", type=int_at_least(1), default=8192, help="perplexity tokens per model")
    d.add_argument("--results", default=None, help="results file to append to")
    d.set_defaults(func=cmd_demo)

    for name in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        importlib.import_module(f"slimlm.commands.{name}").add_parser(sub)
    for sp in sub.choices.values():  # `slimlm eval … --debug` works as well as `slimlm --debug eval …`
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _os_error(exc: OSError) -> SlimlmError:
    """Disk full, read-only or unwritable output: one line naming the file and the fix."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return SlimlmError(f"no space left on the device{where}", "free disk space or write to another folder")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SlimlmError(f"cannot write{where}: {exc.strerror}", "choose a folder you can write to")
    return SlimlmError(f"{exc.strerror or exc}{where}", "check the path and the disk")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr (``--debug`` or SLIMLM_DEBUG=1 adds the traceback)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, one line): returned, so callers in-process see it
        return exc.code if isinstance(exc.code, int) else 2
    debug = getattr(args, "debug", False) or os.environ.get("SLIMLM_DEBUG") == "1"
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("slimlm: interrupted (no partial output was left)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — the one place every failure is turned into one line
        err = exc if isinstance(exc, SlimlmError) else _os_error(exc) if isinstance(exc, OSError) else None
        if debug:
            exc.__suppress_context__ = False  # show what a SlimlmError was raised from
            traceback.print_exception(exc, file=sys.stderr)
        if err is None:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            print(f"slimlm: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                  f"(at {os.path.basename(where.filename)}:{where.lineno}) — rerun with --debug for the traceback "
                  "and report it", file=sys.stderr)
            return 1
        print(f"slimlm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
