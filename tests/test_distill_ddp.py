"""The distillation entry point under torchrun: 2 processes on gloo stay in sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path, default_lm) -> None:
    # default_lm makes sure the converted model cache exists before two processes read it
    with socket.socket() as s:  # torchrun does not hand port 0 on to its workers: pick a free one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "scripts" / "ddp_smoke.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical parameters after the steps
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own slice of the data
