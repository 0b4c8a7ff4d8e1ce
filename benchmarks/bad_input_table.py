"""Run every case of tests/test_bad_input.py's table through the real CLI and record what it prints.

    PYTHONPATH=. python benchmarks/bad_input_table.py [--smoke]   # → benchmarks/results/bad_input_table.json + Markdown

The table in docs/robustness.md is this script's output.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import slimlm  # noqa: E402
from slimlm.cli import main  # noqa: E402
from test_bad_input import CASES, Env  # noqa: E402


def make_artifact(where: Path) -> Path:
    from slimlm.methods.prune.layerdrop import drop_blocks

    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(2, lm.info.n_layers)))
    return slimlm.compress(lm, "steps:\n  - rtn: {bits: 4, group_size: 128}\n", out=where / "art").out


def main_() -> None:
    smoke = "--smoke" in sys.argv  # only the cases that need no model (seconds)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        art = Path(root) / "none" if smoke else make_artifact(Path(root))
        config = Path(root) / "none" if smoke else Path(slimlm.load("default").info.weights_dir) / "config.json"
        for i, case in enumerate(c for c in CASES if c.smoke or not smoke):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            with pytest.MonkeyPatch.context() as mp:
                if case.setup is not None:
                    case.setup(Env(tmp, art, config, mp))
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    rc = main([a.replace("{tmp}", str(tmp)) for a in case.argv])
            line = err.getvalue().strip().replace(str(tmp), "DIR").replace(root, "TMP")
            rows.append({"input": case.id, "argv": " ".join(case.argv).replace("{tmp}", "DIR"), "exit": rc, "prints": line})
    out = ROOT / "benchmarks" / "results" / f"bad_input_table{'_smoke' if smoke else ''}.json"
    out.write_text(json.dumps(rows, indent=1))
    print("| bad input | exit | prints (one line) |\n|---|---:|---|")
    for r in rows:
        print(f"| {r['input']} | {r['exit']} | `` {r['prints'].replace('|', '/')} `` |")


if __name__ == "__main__":
    main_()
