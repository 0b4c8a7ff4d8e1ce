"""``slimlm speculate MODEL PROMPT``: generate with a decoding strategy built on the engine.

    slimlm speculate default "Repeat: …" --draft lookup            # prompt-lookup speculative decoding
    slimlm speculate default "…" --draft self:8                    # self-speculation from the first 8 blocks
    slimlm speculate default "…" --draft out/drop50-kd             # a draft model with the same tokenizer
    slimlm speculate default "…" --amateur out/drop50 --beta 0.5 --alpha 0.1   # contrastive decoding
    slimlm speculate BASE "…" --proxy SMALL_BASE SMALL_TUNED       # proxy-tuning

The text goes to stdout; the strategy's figures (acceptance rate, target forwards, tok/s) to stderr.
"""

from __future__ import annotations

import argparse
import sys

from slimlm.errors import SlimlmError


def cmd_speculate(args: argparse.Namespace) -> None:
    from slimlm.commands.generate import gen_config, make_engine
    from slimlm.models import load
    from slimlm.runtime.contrastive import check_contrastive, contrastive_generate, proxy_generate
    from slimlm.runtime.engine import Engine
    from slimlm.runtime.speculative import SpecConfig, make_draft, speculative_generate
    from slimlm.runtime.vocab import check_same_vocab

    chosen = [name for name, v in (("--draft", args.draft), ("--amateur", args.amateur), ("--proxy", args.proxy)) if v]
    if len(chosen) != 1:
        raise SlimlmError(f"give exactly one of --draft, --amateur, --proxy (got {', '.join(chosen) or 'none'})",
                          "e.g. --draft lookup, or --amateur MODEL --beta 0.5, or --proxy SMALL_BASE SMALL_TUNED")
    cfg = gen_config(args)
    if args.amateur:
        check_contrastive(args.beta, args.alpha)
    spec = SpecConfig(k=args.k, k_max=max(args.k, args.k_max), adaptive=not args.fixed_k)
    spec.validate()  # all options checked before the (slow) model loads
    target = make_engine(args)
    same = {"dtype": target.dtype, "device": args.device, "max_seq": target.max_seq}
    on_token = (lambda _tok, delta: print(delta, end="", flush=True)) if args.stream else None
    if args.draft:
        draft = make_draft(args.draft, target, dtype=target.dtype, device=args.device)
        res = speculative_generate(target, draft, args.prompt, cfg, spec, chat=args.chat, on_token=on_token)
        figures = (f"draft {res.draft}: acceptance {res.acceptance:.1%} ({res.accepted}/{res.proposed} proposed tokens), "
                   f"{res.target_forwards} target forwards for {len(res.tokens)} tokens")
    else:
        others = []
        for src in ([args.amateur] if args.amateur else list(args.proxy)):
            lm = load(src, allow_pickle=args.allow_pickle)
            check_same_vocab(target.tokenizer, lm.tokenizer, args.model, src)
            others.append(Engine(lm, **same))
        if args.amateur:
            res = contrastive_generate(target, others[0], args.prompt, cfg, beta=args.beta, alpha=args.alpha,
                                       chat=args.chat, on_token=on_token)
            figures = f"contrastive β={args.beta} α={args.alpha} (amateur {args.amateur})"
        else:
            res = proxy_generate(target, others[1], others[0], args.prompt, cfg, chat=args.chat, on_token=on_token)
            figures = f"proxy-tuned by {args.proxy[1]} − {args.proxy[0]}"
    print("" if args.stream else res.text)
    print(f"{figures}; {res.decode_tok_s:.1f} tok/s, finish {res.finish_reason}", file=sys.stderr)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from slimlm.commands.generate import add_generation_args

    p = sub.add_parser("speculate", help="speculative (--draft), contrastive (--amateur) or proxy-tuned (--proxy) generation")
    add_generation_args(p)  # MODEL (target / expert / large base) and every GenConfig and engine option of `slimlm generate`
    p.add_argument("prompt")
    p.add_argument("--draft", help="lookup | lookup:N | self:N | a model with the same tokenizer")
    p.add_argument("--k", type=int, default=4, help="draft tokens per target forward (start value)")
    p.add_argument("--k-max", type=int, default=8, help="upper bound of the adaptive k")
    p.add_argument("--fixed-k", action="store_true", help="do not adapt k")
    p.add_argument("--amateur", help="contrastive decoding: the amateur model (same tokenizer)")
    p.add_argument("--beta", type=float, default=0.5, help="contrastive: weight of the amateur's log-prob")
    p.add_argument("--alpha", type=float, default=0.1, help="contrastive: keep tokens with p_expert ≥ α·max p_expert")
    p.add_argument("--proxy", nargs=2, metavar=("SMALL_BASE", "SMALL_TUNED"), help="proxy-tuning: small base and tuned models")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.set_defaults(func=cmd_speculate)
