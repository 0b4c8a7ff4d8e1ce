"""``slimlm export MODEL --format gguf|compressed-tensors|onnx --out PATH``: write a model for another runtime."""

from __future__ import annotations

import argparse


def cmd_export(args: argparse.Namespace) -> None:
    from slimlm.export import export
    from slimlm.models import load

    options = {}
    if args.format == "gguf":
        options = {"type": args.type or "F16", "requantize": args.requantize}
    elif args.format == "compressed-tensors":
        options = {"zero_points": args.zero_points}
    if args.format != "gguf" and (args.type or args.requantize):
        from slimlm.errors import SlimlmError

        raise SlimlmError(f"--type/--requantize apply to GGUF only, not {args.format}", "drop them, or use --format gguf")
    lm = load(args.model, allow_pickle=args.allow_pickle)
    res = export(lm, args.out, format=args.format, overwrite=args.overwrite, **options)
    kinds: dict[str, int] = {}
    for t in res.tensor_types.values():
        kinds[t] = kinds.get(t, 0) + 1
    print(f"{res.format} written to {res.path} ({res.bytes / 1e6:.1f} MB): "
          + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    for note in res.notes:
        print(note)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp), compressed-tensors (vLLM) or ONNX (onnxruntime)")
    p.add_argument("model", help="`default`, a local HF folder, a .gguf file, or a slimlm artifact")
    p.add_argument("--format", required=True, choices=["gguf", "compressed-tensors", "onnx"])
    p.add_argument("--out", required=True, help="file (gguf) or folder (compressed-tensors, onnx) to create")
    p.add_argument("--type", default=None,
                   help="gguf: type of the float matrices (F16 default, BF16, F32, or Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 by gguf's rounding)")
    p.add_argument("--requantize", default=None, metavar="TYPE",
                   help="gguf: write layers GGUF cannot hold as they are (3-bit, NF4, sparse, low-rank) as TYPE; reports the added error")
    p.add_argument("--zero-points", default="packed", choices=["packed", "padded"],
                   help="compressed-tensors: packed (vLLM) or padded to the shape transformers 5.24 loads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_export)
