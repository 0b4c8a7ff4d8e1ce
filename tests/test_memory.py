"""Replaced weights leave the process's memory as a compression pass goes (slimlm/memory.py)."""

from __future__ import annotations

import sys

import psutil
import pytest
import torch
from torch import nn

import slimlm
from slimlm.memory import drop_file_pages, page_out
from slimlm.models.arch import set_module

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/maps are Linux's")


def test_drop_file_pages_only_for_a_discarded_memory_mapped_weight(fresh_default) -> None:
    model = fresh_default.model
    name = "model.layers.0.mlp.down_proj"
    old = model.get_submodule(name).weight
    expected = old.detach().clone()
    set_module(model, name, nn.Linear(old.shape[1], old.shape[0], bias=False))

    assert drop_file_pages(old, model) >= old.numel() * old.element_size() - 2 * 4096
    assert torch.equal(old, expected)  # a clean page reads back from the checkpoint unchanged
    embed = model.get_input_embeddings().weight
    assert drop_file_pages(embed, model) == 0  # still part of the live model (and tied to the head)
    assert drop_file_pages(torch.randn(4096, 64), model) == 0  # ordinary heap memory is never touched


def test_compress_does_not_keep_the_fp_weights_resident(fresh_default) -> None:
    """After RTN-4 every block linear is packed: the checkpoint's fp32 pages of those layers are gone."""
    block_bytes = sum(p.numel() * p.element_size() for n, p in fresh_default.model.named_parameters() if ".layers." in n)
    for p in fresh_default.model.parameters():  # touch every page, as a calibration pass would
        float(p.detach().sum())
    proc = psutil.Process()
    before = proc.memory_full_info().shared
    slimlm.compress(fresh_default, "steps:\n  - rtn: {bits: 4, group_size: 128}\n")
    after = proc.memory_full_info().shared
    assert before - after > 0.9 * block_bytes


def test_page_out_reclaims_a_live_tensor_without_losing_data(tmp_path) -> None:
    """A table being re-encoded slice by slice: each read slice leaves RSS, values (even modified ones) stay."""
    import numpy as np

    expected = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))  # 16 MiB
    path = tmp_path / "table.bin"
    expected.numpy().tofile(path)
    # a private copy-on-write map of a file no other process maps, as safetensors weights are
    table = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c", shape=(1024, 4096)))
    float(table.sum())  # every page resident, as a pass over the table makes it
    proc = psutil.Process()
    before = proc.memory_full_info().shared
    nbytes = table.numel() * table.element_size()
    assert page_out(table) >= nbytes - 2 * 4096
    assert before - proc.memory_full_info().shared > 0.9 * nbytes
    assert torch.equal(table, expected)  # clean pages read back from the file
    table[0, :8] = 7.0  # a modified (copy-on-write) page is kept, never reverted to the file
    page_out(table)
    assert torch.equal(table[0, :8], torch.full((8,), 7.0)) and torch.equal(table[1:], expected[1:])
    assert page_out(torch.randn(4096, 64)) == 0  # ordinary heap memory is never advised
