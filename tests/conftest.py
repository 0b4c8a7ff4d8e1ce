"""Shared fixtures: the real default model (SmolLM2-135M) and evaluation text.

Loading ``default`` from the converted cache takes about a second, so tests that change a model
load their own copy; read-only tests share one session-wide instance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import slimlm
from slimlm.data import load_text
from slimlm.errors import SlimlmError


@pytest.fixture(scope="session")
def default_lm() -> slimlm.LoadedModel:
    """Read-only: do not compress this instance in place (use ``fresh_default``)."""
    return slimlm.load("default")


@pytest.fixture
def fresh_default(default_lm) -> slimlm.LoadedModel:
    """A private copy of the default model for tests that change it."""
    return slimlm.load("default")


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


def data_dir_or_skip() -> Path:
    try:
        from slimlm.data import data_dir

        return data_dir()
    except SlimlmError as exc:
        pytest.skip(str(exc))
