"""Kernel tests for packing and RTN on small layers with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.layers.quant import QuantLinear, pack_bits, unpack_bits
from slimlm.methods.quant.grid import fit_grid, round_to_nearest


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (7, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-codes.numel() * bits // 8)  # exactly bits per code, rounded up to a byte
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).reshape(7, 13).long(), codes)


def test_rtn_known_answer_asymmetric() -> None:
    # One group [0, 1, 2, 3] at 2 bits: scale 1, zero 0 → exact.
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    qw = round_to_nearest(w, bits=2, group_size=4, symmetric=False)
    assert qw.q.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(qw.dequantize(), w)


def test_rtn_known_answer_symmetric() -> None:
    # absmax 3 at 3 bits: scale 3/3 = 1, zero point 4; -3..3 are exact.
    w = torch.tensor([[-3.0, -1.0, 0.0, 2.0, 3.0, 1.0, -2.0, 0.0]])
    qw = round_to_nearest(w, bits=3, group_size=8, symmetric=True)
    assert torch.equal(qw.dequantize(), w)
    assert int(qw.zero[0, 0]) == 4


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_error_bounded_by_half_step(bits: int, symmetric: bool) -> None:
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    qw = round_to_nearest(w, bits, 16, symmetric)
    step = qw.scale.float().repeat_interleave(16, dim=1)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_partial_last_group_and_error_decreases_with_bits() -> None:
    w = torch.randn(4, 40, generator=torch.Generator().manual_seed(1))  # 40 = 32 + partial 8
    scale, zero = fit_grid(w, 4, 32, False)
    assert scale.shape == (4, 2) and zero.shape == (4, 2)
    errs = [float((round_to_nearest(w, b, 32, False).dequantize() - w).pow(2).mean()) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]


def test_quant_linear_matches_dequantized_weight() -> None:
    lin = nn.Linear(24, 6, bias=True)
    qw = round_to_nearest(lin.weight.detach(), 4, 8, False)
    q = QuantLinear.from_quantized(qw, lin.bias)
    x = torch.randn(3, 24)
    expected = x @ qw.dequantize().T + lin.bias
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert q.qweight.numel() == 24 * 6 // 2  # two 4-bit codes per byte
    assert q.logical_numel() == 24 * 6 + 6
