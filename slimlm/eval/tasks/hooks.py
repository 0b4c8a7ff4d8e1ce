"""Python hooks that tasks name in their YAML (``process_doc: hellaswag``) to reshape raw documents."""

from __future__ import annotations

import re
from typing import Any, Callable

from slimlm.registry import Registry

Doc = dict[str, Any]
HOOKS: Registry[Callable[[Doc], Doc]] = Registry("task hook", "slimlm.eval.tasks")


def hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts: ``[title]`` markers, other bracketed tags, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: Doc) -> Doc:
    """lm-eval's HellaSwag query ``label: ctx_a Ctx_b`` (the file joins ctx_a and ctx_b, so the last
    sentence fragment is capitalised, as ``ctx_b.capitalize()`` does) and cleaned endings."""
    ctx = doc["ctx"]
    head, sep, tail = ctx.rpartition(". ")
    if sep and tail[:1].islower():
        ctx = f"{head}. {tail.capitalize()}"
    return {**doc, "query": hellaswag_clean(f"{doc['activity_label']}: {ctx}"),
            "choices": [hellaswag_clean(e) for e in doc["endings"]]}


def truthfulqa_mc(doc: Doc) -> Doc:
    """TruthfulQA's answer sets as one choice list: the correct answers (best first), then the incorrect
    ones. ``mc1_choices`` indexes the best answer and the incorrect ones (MC1); ``n_correct`` splits the
    list for MC2 (TruthfulQA's CSV: ``Best Answer``, ``Correct Answers``, ``Incorrect Answers``)."""
    best = doc["Best Answer"].strip()
    correct = list(dict.fromkeys([best, *doc["Correct Answers"]]))
    incorrect = [a for a in dict.fromkeys(doc["Incorrect Answers"]) if a not in correct]
    return {**doc, "question": doc["Question"].strip(), "choices": correct + incorrect, "n_correct": len(correct),
            "mc1_choices": [0, *range(len(correct), len(correct) + len(incorrect))], "label": 0}


HOOKS.register("hellaswag", hellaswag)
HOOKS.register("truthfulqa_mc", truthfulqa_mc)
