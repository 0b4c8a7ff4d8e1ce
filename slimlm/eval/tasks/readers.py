"""Readers: a task's data file → a list of raw documents (dicts), read in place.

HellaSwag is read from its bz2 text file and BLiMP from its tar.xz archive without unpacking, so
the evaluation data never has to be copied (into the project or anywhere else). Every reader
names the file and line of a malformed record.
"""

from __future__ import annotations

import bz2
import json
import tarfile
from pathlib import Path
from typing import Any, Callable

from slimlm.data import data_dir
from slimlm.errors import SlimlmError
from slimlm.registry import Registry

Doc = dict[str, Any]
READERS: Registry = Registry("task reader", "slimlm.eval.tasks")


def resolve_path(path: str) -> Path:
    """An absolute or ``./``-relative path as given; otherwise relative to ``$SLIMLM_DATA_DIR``."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        if not p.exists():
            raise SlimlmError(f"task data file {p} not found", "check the task's `path`")
        return p
    full = data_dir() / path
    if not full.exists():
        raise SlimlmError(f"task data file {full} not found", "check SLIMLM_DATA_DIR and the task's `path`")
    return full


def parse_jsonl_lines(lines: list[str], where: str) -> list[Doc]:
    """JSON objects, one per non-empty line; a bad line is reported with its number."""
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SlimlmError(f"{where}, line {n}: not valid JSON ({exc.msg})", "fix or remove that line") from None
        if not isinstance(doc, dict):
            raise SlimlmError(f"{where}, line {n}: expected a JSON object, got {type(doc).__name__}", "write one object per line")
        doc["_line"] = n
        docs.append(doc)
    return docs


def _register(name: str) -> Callable[[Callable[..., list[Doc]]], Callable[..., list[Doc]]]:
    def deco(fn: Callable[..., list[Doc]]) -> Callable[..., list[Doc]]:
        READERS.register(name, fn)
        return fn

    return deco


@_register("jsonl")
def read_jsonl(path: str, **_: Any) -> list[Doc]:
    """Any user JSONL file: one object per line."""
    p = resolve_path(path)
    return parse_jsonl_lines(p.read_text(encoding="utf-8").splitlines(), str(p))


@_register("piqa")
def read_piqa(path: str, labels: str | None = None, **_: Any) -> list[Doc]:
    """PIQA rows (``goal``, ``sol1``, ``sol2``); gold ``label`` from the separate labels file if given."""
    docs = read_jsonl(path)
    if labels:
        lp = resolve_path(labels)
        golds = [line.strip() for line in lp.read_text().splitlines() if line.strip()]
        if len(golds) != len(docs):
            raise SlimlmError(f"{lp} has {len(golds)} labels for {len(docs)} PIQA rows", "use the labels file that belongs to the data file")
        for doc, gold in zip(docs, golds):
            doc["label"] = int(gold)
    return docs


@_register("hellaswag")
def read_hellaswag(path: str, **_: Any) -> list[Doc]:
    """The 6-line HellaSwag text format: ``activity_label: ctx``, gold index, 4 endings."""
    p = resolve_path(path)
    opener = bz2.open if p.suffix == ".bz2" else open
    with opener(p, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) % 6:
        raise SlimlmError(f"{p} has {len(lines)} lines, not a multiple of 6", "each HellaSwag item is 6 lines: `label: context`, gold, 4 endings")
    docs = []
    for i in range(0, len(lines), 6):
        head, gold = lines[i], lines[i + 1].strip()
        label, sep, ctx = head.partition(": ")
        if not sep or gold not in {"0", "1", "2", "3"}:
            raise SlimlmError(f"{p}, line {i + 1}: malformed HellaSwag item", "expected `label: context` then a gold index 0-3")
        docs.append({"activity_label": label, "ctx": ctx, "endings": lines[i + 2 : i + 6], "label": int(gold), "_line": i + 1})
    return docs


@_register("blimp")
def read_blimp(path: str, phenomena: list[str] | str = "all", per_phenomenon: int | None = None, **_: Any) -> list[Doc]:
    """BLiMP pairs from the tar.xz archive, interleaved across phenomena so any prefix is balanced."""
    p = resolve_path(path)
    groups: dict[str, list[Doc]] = {}
    seen: list[str] = []
    with tarfile.open(p) as tar:
        for member in tar:  # one sequential pass: seeking back in an xz stream re-decompresses it
            name = Path(member.name).stem
            if not (member.isfile() and member.name.endswith(".jsonl")):
                continue
            seen.append(name)
            if phenomena == "all" or name in phenomena:
                raw = tar.extractfile(member).read().decode("utf-8").splitlines()  # type: ignore[union-attr]
                groups[name] = parse_jsonl_lines(raw, f"{p}:{member.name}")[:per_phenomenon]
    unknown = [w for w in ([] if phenomena == "all" else phenomena) if w not in groups]
    if unknown:
        raise SlimlmError(f"BLiMP has no phenomenon {unknown[0]!r}", f"choose from {', '.join(sorted(seen)[:5])}, … ({len(seen)} in {p.name})")
    if phenomena != "all":
        groups = {name: groups[name] for name in phenomena}
    docs = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        for name, g in groups.items():
            if i < len(g):
                docs.append({**g[i], "group": name})
    return docs


@_register("text")
def read_text(path: str, **_: Any) -> list[Doc]:
    """One document: a whole .txt file (or a folder's .txt files), else the evaluation split of a
    slimlm text source (``wikitext2``, ``shakespeare``)."""
    from slimlm.data import load_text

    p = Path(path).expanduser()
    if p.exists():
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
        return [{"text": "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)}]
    return [{"text": load_text(path, "eval")}]


@_register("csv")
def read_csv(path: str, split: dict[str, str] | None = None, group: str | None = None, **_: Any) -> list[Doc]:
    """A CSV file with a header row (TruthfulQA, CrowS-Pairs). ``split`` turns string fields into lists
    (``{"Correct Answers": "; "}``); ``group`` names the field that per-group metrics break down by."""
    import csv

    p = resolve_path(path)
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in [*(split or {}), *([group] if group else [])] if k not in (reader.fieldnames or [])]
        if missing:
            raise SlimlmError(f"{p} has no column {missing[0]!r}", f"columns: {', '.join(reader.fieldnames or [])}")
        docs = []
        for n, row in enumerate(reader, 2):
            doc: Doc = dict(row)
            for key, sep in (split or {}).items():
                doc[key] = [s.strip() for s in (row[key] or "").split(sep) if s.strip()]
            if group:
                doc["group"] = row[group]
            doc["_line"] = n
            docs.append(doc)
    return docs
