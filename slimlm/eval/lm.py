"""The three calls of lm-evaluation-harness's model interface, over any model slimlm loads or makes.

``loglikelihood`` scores continuations given contexts (multiple choice, minimal pairs),
``loglikelihood_rolling`` scores whole texts (perplexity) and ``generate_until`` decodes greedily up
to stop strings. The conventions follow lm-eval's ``HFLM`` (``lm_eval/models/huggingface.py``) so
numbers are comparable: trailing context whitespace moves into the continuation, the continuation's
tokens are those of ``encode(context + continuation)`` past ``encode(context)``, an empty context is
replaced by one prefix token (BOS where the model wants one, else EOS), and texts are scored in
disjoint rolling windows that each predict every token once.

CPU-friendly: requests are sorted by length and packed into right-padded batches under a token
budget (right padding needs no attention mask under causal attention), and the vocabulary
projection runs only at the scored positions (``logits_to_keep``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from slimlm.models.load import LoadedModel

Pair = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


class SlimlmLM:
    """lm-eval's ``loglikelihood`` / ``loglikelihood_rolling`` / ``generate_until`` for a ``LoadedModel``."""

    def __init__(self, lm: LoadedModel, *, batch_tokens: int = 4096, max_batch: int = 64, max_length: int = 2048) -> None:
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        limit = getattr(self.model.config, "max_position_embeddings", max_length) or max_length
        self.max_length = min(max_length, limit)
        tok = self.tokenizer
        self.prefix_id = tok.bos_token_id if lm.info.add_bos else (tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (BOS is handled by the callers)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """lm-eval's split: the continuation's ids are those the joint encoding adds past the context."""
        if not context:
            return [self.prefix_id], self.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        head = [self.tokenizer.bos_token_id] if self.lm.info.add_bos else []
        return head + ctx, whole[len(ctx):]

    # --- the three calls -------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding would produce it) per request."""
        return self.score_pairs([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Total log-likelihood of each text, every token predicted once, in windows of ``max_length``."""
        pairs: list[Pair] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            for pair in self.rolling_windows(self.encode(text)):
                pairs.append(pair)
                owners.append(i)
        totals = [0.0] * len(texts)
        for owner, (logp, _) in zip(owners, self.score_pairs(pairs)):
            totals[owner] += logp
        return totals

    @torch.no_grad()
    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Greedy continuation of each context, cut at the first stop string of ``until``."""
        outs = []
        for context, kwargs in requests:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            head = [self.tokenizer.bos_token_id] if self.lm.info.add_bos else []
            ids = head + self.encode(context) if context else [self.prefix_id]
            outs.append(self._greedy(ids, [s for s in until if s], max_new))
        return outs

    # --- machinery -------------------------------------------------------------------------------

    def rolling_windows(self, tokens: list[int]) -> list[Pair]:
        """Disjoint prediction windows: the first is conditioned on the prefix token, later ones on
        the ``max_length`` tokens before them (lm-eval's ``get_rolling_token_windows``, context_len=1)."""
        n = self.max_length
        pairs: list[Pair] = []
        done = 0
        while done < len(tokens):
            pred = tokens[done : done + n]
            ctx = [self.prefix_id] if done == 0 else tokens[max(0, done + len(pred) - n - 1) : done]
            pairs.append((ctx, pred))
            done += len(pred)
        return pairs

    @torch.no_grad()
    def score_pairs(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """Batched scoring of token-level (context, continuation) pairs, longest first."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        start = 0
        while start < len(order):
            longest = min(self.max_length, len(pairs[order[start]][0]) + len(pairs[order[start]][1]) - 1)
            size = max(1, min(self.max_batch, self.batch_tokens // max(longest, 1)))
            chunk = order[start : start + size]
            for i, res in zip(chunk, self._score_batch([pairs[i] for i in chunk])):
                results[i] = res
            start += size
        return [r for r in results if r is not None]

    def _score_batch(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        rows, spans = [], []
        for ctx, cont in pairs:
            cont = cont[-self.max_length:]
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # the last token is only a target
            rows.append(inp)
            spans.append((len(inp) - len(cont), cont))
        width = max(len(r) for r in rows)
        n_keep = max(len(c) for _, c in spans)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), right-padded
        keep = torch.zeros(len(rows), n_keep, dtype=torch.long)  # (B, K) scored positions per row
        for b, (row, (first, cont)) in enumerate(zip(rows, spans)):
            ids[b, : len(row)] = torch.tensor(row)
            pos = list(range(first, first + len(cont)))
            keep[b] = torch.tensor(pos + [pos[-1]] * (n_keep - len(pos)))
        device = self.device
        logits = self.model(input_ids=ids.to(device), use_cache=False, logits_to_keep=keep.to(device)).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, K, V)
        out = []
        for b, (_, cont) in enumerate(spans):
            target = torch.tensor(cont, device=device)
            row = logp[b, : len(cont)]  # (len(cont), V)
            total = float(row.gather(-1, target[:, None]).sum())
            out.append((total, bool((row.argmax(-1) == target).all())))
        return out

    def _greedy(self, ids: list[int], until: list[str], max_new: int) -> str:
        """Greedy decoding by the engine (static KV cache, fast kernels); stops at EOS or a stop string."""
        from slimlm.runtime.engine import engine_for
        from slimlm.runtime.sampling import GenConfig

        engine = engine_for(self.lm, max_seq=self.max_length)
        keep = max(1, self.max_length - max_new)  # the prompt's tail, leaving room for the continuation
        return engine.generate(ids[-keep:], GenConfig(max_new_tokens=max_new, stop=until)).text  # type: ignore[union-attr]
