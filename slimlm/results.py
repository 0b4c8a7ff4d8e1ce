"""Results rows: every evaluation appends JSON lines carrying machine, versions, git hash and recipe."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

import torch


def default_results_path() -> Path:
    return Path(os.environ.get("SLIMLM_RESULTS", "slimlm-results/results.jsonl"))


def run_metadata() -> dict[str, Any]:
    """Where and with what a result was produced."""
    import transformers

    from slimlm import __version__
    from slimlm.artifact import git_hash

    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"slimlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "git_hash": git_hash(),
    }


def append_rows(rows: Iterable[dict[str, Any]], path: str | Path | None = None) -> Path:
    """Append ``rows`` as JSON lines (one ``write`` per row batch, so concurrent appends stay whole) and to the
    results database (:mod:`slimlm.store`)."""
    target = Path(path) if path else default_results_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    payload = "".join(json.dumps(r, default=str) + "\n" for r in rows)
    with open(target, "a", encoding="utf-8") as f:
        f.write(payload)
    from slimlm.store import ResultsStore

    # The SQLite store beside the JSONL ($SLIMLM_RESULTS_DB wins) is what `slimlm results/report` read.
    ResultsStore(None if os.environ.get("SLIMLM_RESULTS_DB") or not path else target.with_suffix(".db")).add_rows(rows)
    return target
