"""GPTQ vs RTN layer by layer, in-sample and on held-out calibration tokens (SmolLM2-135M, first blocks).

For each linear of the first ``--blocks`` blocks it prints the Hessian-weighted relative output error
``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` of RTN and of GPTQ, with ``H`` from the tokens GPTQ was solved on
(in-sample) and from other tokens (held-out), plus the share of each layer's Hessian trace owed to the
first token of every window (attention-sink tokens with huge activations bias the solve).

    .venv/bin/python benchmarks/gptq_layers.py --blocks 3 --train 8 --heldout 8
"""

from __future__ import annotations

import argparse
import json

import torch

import slimlm
from slimlm.calibrate import run_sequential
from slimlm.config import CalibrationConfig
from slimlm.data import calibration_ids
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.methods.quant.gptq import gptq_quantize
from slimlm.methods.quant.grid import round_to_nearest
from slimlm.models.arch import block_linears


def rel_err(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = w_hat - w
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--train", type=int, default=8, help="batches of 4 × 512 tokens GPTQ is solved on")
    ap.add_argument("--heldout", type=int, default=8, help="batches of 4 × 512 other tokens to score on")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", default="wikitext2")
    args = ap.parse_args()

    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(args.blocks, lm.info.n_layers)))
    n = 4 * (args.train + args.heldout)
    ids = calibration_ids(lm.tokenizer, CalibrationConfig(source=args.calib, n_samples=n, seqlen=512), None)
    rows = []

    def process(ctx) -> None:
        lins = block_linears(ctx.block, lm.arch)
        inputs, kwargs = ctx.inputs, ctx.kwargs
        stats = {}
        energy = {name: [0.0, 0.0] for name in lins}  # (first token of each window, all tokens) Σx²

        def tally(name: str, x: torch.Tensor) -> None:
            energy[name][0] += float(x[:, 0].pow(2).sum())
            energy[name][1] += float(x.pow(2).sum())

        hooks = [m.register_forward_hook(lambda _m, i, _o, n=n: tally(n, i[0])) for n, m in lins.items()]
        for part, sl in (("train", slice(0, args.train)), ("heldout", slice(args.train, None))):
            ctx.inputs, ctx.kwargs, ctx.fp_outputs = inputs[sl], kwargs[sl], None
            stats[part] = ctx.collect(lins, {"hessian"})
        for hook in hooks:
            hook.remove()
        ctx.inputs, ctx.kwargs, ctx.fp_outputs = inputs, kwargs, None
        for name, lin in lins.items():
            w = lin.weight.detach().float()
            h, h2 = stats["train"][name].hessian, stats["heldout"][name].hessian
            rtn = round_to_nearest(w, args.bits, args.group_size, False).dequantize()
            gq = gptq_quantize(w, h, bits=args.bits, group_size=args.group_size).dequantize()
            row = {"block": ctx.index, "layer": name, "rtn_in": rel_err(w, rtn, h), "gptq_in": rel_err(w, gq, h),
                   "rtn_heldout": rel_err(w, rtn, h2), "gptq_heldout": rel_err(w, gq, h2),
                   "first_token_share_of_trace": energy[name][0] / energy[name][1]}
            rows.append(row)
            print(f"block {ctx.index} {name:<18} RTN {row['rtn_in']:.2e} / {row['rtn_heldout']:.2e}   "
                  f"GPTQ {row['gptq_in']:.2e} / {row['gptq_heldout']:.2e}   (in-sample / held-out); "
                  f"first tokens hold {100 * row['first_token_share_of_trace']:.1f}% of tr H", flush=True)

    run_sequential(lm.model, lm.arch, ids, process)
    ratio = [r["gptq_heldout"] / r["rtn_heldout"] for r in rows]
    print(f"\nheld-out GPTQ/RTN error ratio: median {sorted(ratio)[len(ratio) // 2]:.2f}, max {max(ratio):.2f}")
    print(json.dumps({"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
