"""Run a task on a model through the three-call interface and score it.

Multiple choice follows lm-evaluation-harness: each choice is scored by the summed log-likelihood
of ``delimiter + choice`` given the context; ``acc`` takes the argmax of the raw sums, ``acc_norm``
of the sums divided by the choice's length in UTF-8 bytes. A minimal pair (BLiMP) is a two-choice
item with an empty context. Generation is greedy with exact-match / contains scoring.
"""

from __future__ import annotations

import math
import random
import re
import string
import time
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.eval.lm import SlimlmLM
from slimlm.eval.tasks.hooks import HOOKS
from slimlm.eval.tasks.readers import READERS, Doc
from slimlm.eval.tasks.spec import TaskSpec, load_task
from slimlm.models.load import LoadedModel
from slimlm.results import run_metadata


def select(n: int, limit: int | None, seed: int | None) -> list[int]:
    """The first ``limit`` indices, or a ``seed``-ed random sample of them (kept in file order)."""
    if limit is None or limit >= n:
        return list(range(n))
    return list(range(limit)) if seed is None else sorted(random.Random(seed).sample(range(n), limit))


def load_docs(spec: TaskSpec) -> list[Doc]:
    """Read, subsample and (via the hook) reshape the task's documents."""
    docs = READERS.get(spec.reader)(spec.path, **spec.reader_options)
    docs = [docs[i] for i in select(len(docs), spec.limit, spec.seed)]
    if spec.process_doc:
        fn = HOOKS.get(spec.process_doc)  # a registered name only (checked when the spec was read)
        docs = [fn(d) for d in docs]
    return docs


def _fmt(template: str, doc: Doc, spec: TaskSpec) -> str:
    try:
        return template.format_map(doc)
    except (KeyError, IndexError, ValueError) as exc:
        raise SlimlmError(f"task {spec.name}: document at line {doc.get('_line', '?')} of {spec.path} cannot fill "
                          f"{template!r} ({exc!r})", "give every document the fields the task's format strings use") from None


def mc_item(doc: Doc, spec: TaskSpec) -> tuple[str, list[str], int]:
    """(context, choices, gold index) of one multiple-choice document."""
    if isinstance(spec.choices, str):
        choices = doc.get(spec.choices)
        if not isinstance(choices, list) or not choices:
            raise SlimlmError(f"task {spec.name}: document at line {doc.get('_line', '?')} of {spec.path} has no list "
                              f"field {spec.choices!r}", "add the choices list, or set `choices:` to format strings")
    else:
        choices = [_fmt(c, doc, spec) for c in spec.choices]
    gold = spec.gold if isinstance(spec.gold, int) else doc.get(spec.gold)
    try:
        gold = int(gold)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        gold = -1
    if not 0 <= gold < len(choices):
        raise SlimlmError(f"task {spec.name}: document at line {doc.get('_line', '?')} of {spec.path} has gold "
                          f"{doc.get(spec.gold) if isinstance(spec.gold, str) else spec.gold!r}, not an index into its "
                          f"{len(choices)} choices", f"set field {spec.gold!r} to an integer 0..{len(choices) - 1}")
    return _fmt(spec.text, doc, spec), choices, gold


def _acc(name: str, hits: list[bool]) -> dict[str, float]:
    p = sum(hits) / len(hits)
    return {name: p, f"{name}_stderr": math.sqrt(p * (1 - p) / max(len(hits) - 1, 1))}


def choice_logliks(slm: SlimlmLM, items: list[tuple[str, list[str], int]], delimiter: str) -> list[list[float]]:
    """Per item, the summed log-likelihood of ``delimiter + choice`` given its context, for every choice."""
    lls = [ll for ll, _ in slm.loglikelihood([(ctx, delimiter + c) for ctx, choices, _ in items for c in choices])]
    out, at = [], 0
    for _, choices, _ in items:
        out.append(lls[at : at + len(choices)])
        at += len(choices)
    return out


def mc_hits(ll: list[float], choices: list[str], gold: int) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: the argmax of the raw sums, and of the sums per UTF-8 byte."""
    norm = [x / max(len(c.encode("utf-8")), 1) for x, c in zip(ll, choices)]
    return max(range(len(ll)), key=ll.__getitem__) == gold, max(range(len(norm)), key=norm.__getitem__) == gold


def score_multiple_choice(slm: SlimlmLM, docs: list[Doc], spec: TaskSpec) -> dict[str, float]:
    items = [mc_item(d, spec) for d in docs]
    acc, acc_norm, groups = [], [], {}
    for doc, (_, choices, gold), ll in zip(docs, items, choice_logliks(slm, items, spec.delimiter)):
        hit, hit_norm = mc_hits(ll, choices, gold)
        acc.append(hit)
        acc_norm.append(hit_norm)
        if "group" in doc:
            groups.setdefault(doc["group"], []).append(acc[-1])
    out = {**_acc("acc", acc), **_acc("acc_norm", acc_norm)}
    out.update({f"acc/{g}": sum(h) / len(h) for g, h in sorted(groups.items())})
    return out


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces: the usual exact-match normalisation."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def score_generation(slm: SlimlmLM, docs: list[Doc], spec: TaskSpec) -> dict[str, float]:
    gen = {"until": spec.until, "max_gen_toks": spec.max_gen_toks}
    outs = slm.generate_until([(_fmt(spec.text, d, spec), gen) for d in docs])
    exact, contains = [], []
    for doc, out in zip(docs, outs):
        answers = doc.get(spec.answers)
        if answers is None:
            raise SlimlmError(f"task {spec.name}: document at line {doc.get('_line', '?')} of {spec.path} has no field "
                              f"{spec.answers!r}", "give every QA document its answer (a string or a list of strings)")
        gold = [normalize_answer(str(a)) for a in (answers if isinstance(answers, list) else [answers])]
        pred = normalize_answer(out)
        exact.append(pred in gold)
        contains.append(any(g and g in pred for g in gold))
    return {**_acc("exact_match", exact), **_acc("contains", contains)}


def score_perplexity(slm: SlimlmLM, docs: list[Doc], spec: TaskSpec) -> dict[str, float]:
    """Token, word and byte-level perplexity of the text (lm-eval's wikitext metrics), rolling windows."""
    texts = []
    for doc in docs:
        text = doc["text"]
        if spec.max_tokens:
            text = slm.tokenizer.decode(slm.encode(text)[: spec.max_tokens])
        texts.append(text)
    window = slm.max_length
    slm.max_length = spec.window
    try:
        logp = sum(slm.loglikelihood_rolling(texts))
    finally:
        slm.max_length = window
    tokens = sum(len(slm.encode(t)) for t in texts)
    words = sum(len(re.split(r"\s+", t.strip())) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"token_perplexity": math.exp(-logp / tokens), "word_perplexity": math.exp(-logp / words),
            "bits_per_byte": -logp / nbytes / math.log(2), "tokens": float(tokens)}


SCORERS = {"multiple_choice": score_multiple_choice, "generation": score_generation, "perplexity": score_perplexity}


def run_task(slm: SlimlmLM, spec: TaskSpec) -> dict[str, Any]:
    """``{"task", "n", "metrics", "seconds", "limit", "seed"}``: only the metrics the task asks for (plus
    their stderr and per-group breakdowns)."""
    t0 = time.perf_counter()
    docs = load_docs(spec)
    if not docs:
        raise SlimlmError(f"task {spec.name} has no documents in {spec.path}", "check the data file and the task's reader options")
    scores = SCORERS[spec.type](slm, docs, spec)
    wanted = spec.metrics or list(scores)
    metrics = {k: v for k, v in scores.items() if k.split("/")[0].removesuffix("_stderr") in wanted}
    return {"task": spec.name, "n": len(docs), "metrics": metrics, "seconds": time.perf_counter() - t0,
            "limit": spec.limit, "seed": spec.seed}


def task_rows(lm: LoadedModel, refs: list[str], *, limit: int | None = None, seed: int | None = None,
              label: str | None = None, batch_tokens: int = 4096) -> list[dict[str, Any]]:
    """Run each task of ``refs`` (names, YAML paths or ``name=DATA``) on ``lm``: one result row per task
    with the run's provenance, ready for :func:`slimlm.results.append_rows`."""
    specs = [load_task(r, limit=limit, seed=seed) for r in refs]  # every task is checked before any runs
    slm = SlimlmLM(lm, batch_tokens=batch_tokens)
    base = {"model": label or lm.info.source, "source_kind": lm.info.source_kind, "source_hash": lm.info.source_hash,
            "model_type": lm.info.model_type, "recipe": lm.info.recipe, **run_metadata()}
    rows = []
    for spec in specs:
        res = run_task(slm, spec)
        rows.append({"kind": "task", "task": res["task"], "n": res["n"], "limit": res["limit"], "seed": res["seed"],
                     "seconds": res["seconds"], **res["metrics"], **base})
    return rows
