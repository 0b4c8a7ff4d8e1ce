"""``slimlm sensitivity MODEL``: rank linears by the output error of quantizing each one alone."""

from __future__ import annotations

import argparse
import json


def cmd_sensitivity(args: argparse.Namespace) -> None:
    from slimlm.models import load
    from slimlm.sensitivity import format_table, layer_sensitivity

    lm = load(args.model, allow_pickle=args.allow_pickle)
    meta = {"model": args.model, "bits": args.bits, "group_size": args.group_size, "symmetric": args.symmetric,
            "method": args.method, "metric": args.metric, "unit": args.unit, "source": args.data,
            "n_windows": args.windows, "seqlen": args.seqlen}
    scores = layer_sensitivity(lm, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                               method=args.method, metric=args.metric, unit=args.unit, source=args.data,
                               n_windows=args.windows, seqlen=args.seqlen, targets=args.targets,
                               exclude=args.exclude, progress=not args.json)
    if args.json:
        print(json.dumps({**meta, "scores": scores}))
    else:
        print(format_table(scores, meta, top=args.top or None))


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sensitivity", help="per-layer output error of quantizing one layer at a time")
    s.add_argument("model", help="`default`, a local HF folder, a .gguf file, or a slimlm artifact")
    s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt pickle checkpoints (runs code from the file)")
    s.add_argument("--bits", type=int, default=4, help="bit width to test each layer at (2–8)")
    s.add_argument("--group-size", type=int, default=128, help="columns per quantization group (-1 = per channel)")
    s.add_argument("--symmetric", action="store_true", help="symmetric grid (default asymmetric)")
    s.add_argument("--method", default="rtn", help="quantizer applied to each layer: rtn | gptq")
    s.add_argument("--metric", default="kl", help="kl (KL of final next-token distributions) | nll (NLL increase)")
    s.add_argument("--unit", default="layer", help="layer (each linear) | block (all linears of a block together)")
    s.add_argument("--data", default="shakespeare", help="calibration text: shakespeare | wikitext2 | path to .txt")
    s.add_argument("--windows", type=int, default=4, help="calibration windows")
    s.add_argument("--seqlen", type=int, default=128, help="tokens per window")
    s.add_argument("--targets", default=".*", help="regex on module names to measure")
    s.add_argument("--exclude", default=None, help="regex on module names to skip")
    s.add_argument("--top", type=int, default=0, help="print only the N most sensitive (0 = all)")
    s.add_argument("--json", action="store_true", help="print one JSON object with every score")
    s.set_defaults(func=cmd_sensitivity)
