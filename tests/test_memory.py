"""Replaced weights leave the process's memory as a compression pass goes (slimlm/memory.py)."""

from __future__ import annotations

import sys

import psutil
import pytest
import torch
from torch import nn

import slimlm
from slimlm.memory import drop_file_pages
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
