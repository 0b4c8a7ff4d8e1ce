"""DDP smoke run of the distillation entry point: a few KD steps on a 2-block SmolLM2 student.

    torchrun --nproc_per_node 2 scripts/ddp_smoke.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json`` with a digest of its final parameters and its own
losses; tests/test_distill_ddp.py checks that the digests agree (ranks in sync) while the losses
differ (each rank saw its own data).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import slimlm
from slimlm.distill import DistillConfig, train
from slimlm.methods.prune.layerdrop import drop_blocks


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    teacher = slimlm.load("default")
    student = slimlm.load("default")
    drop_blocks(student.model, student.arch, set(range(1, 29)))  # keep blocks 0 and 29
    cfg = DistillConfig(loss="fkl", steps=3, batch_size=1, seq_len=32, lr=1e-3, progress=False)
    res = train(student.model, teacher.model, student.tokenizer, cfg, teacher_tokenizer=teacher.tokenizer)
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "digest": param_digest(res.model), "losses": res.losses}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
