"""Compact sparse formats: exact round trips, real byte savings, and a real SmolLM2 artifact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimlm
from slimlm.layers.quant import QuantLinear
from slimlm.layers.sparse import NMSparseLinear, SparseLinear, SparseQuantLinear, compact_layer
from slimlm.methods.prune.magnitude import magnitude_mask
from slimlm.methods.quant.grid import round_to_nearest


def _pruned_linear(out: int, inp: int, bias: bool, **pattern) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(magnitude_mask(lin.weight, **pattern))
    return lin


def _nbytes(mod: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in mod.buffers())


def _reload(mod: nn.Module) -> nn.Module:
    """What an artifact does: rebuild empty from the spec, then load the state dict."""
    fresh = type(mod).empty(mod.spec())
    fresh.load_state_dict(mod.state_dict())
    return fresh


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pattern,fmt", [({"sparsity": 0.5}, SparseLinear), ({"sparsity": 0.9}, SparseLinear),
                                         ({"n": 2, "m": 4}, NMSparseLinear), ({"n": 4, "m": 8}, NMSparseLinear)])
def test_float_formats_round_trip_and_shrink(pattern, fmt, bias):
    lin = _pruned_linear(24, 64, bias, **pattern)
    name = f"{pattern['n']}:{pattern['m']}" if "n" in pattern else "unstructured"
    compact = compact_layer(lin, name, torch.float16)
    assert type(compact) is fmt
    expect = lin.weight.detach().half().float()
    assert torch.equal(compact.weight, expect)
    reloaded = _reload(compact)
    assert torch.equal(reloaded.weight, expect)
    x = torch.randn(3, 64)
    assert torch.equal(reloaded(x), compact(x))
    nnz = int((lin.weight != 0).sum())
    if fmt is SparseLinear:
        assert _nbytes(compact) == lin.weight.numel() // 8 + 2 * nnz  # 1-bit mask + fp16 values
    else:
        assert _nbytes(compact) == 2 * nnz + nnz * compact.index_bits // 8  # fp16 values + in-group indices
    assert _nbytes(compact) < lin.weight.numel() * 2  # fp16 dense
    assert compact.logical_numel() == nnz + (24 if bias else 0)

def test_nm_format_keeps_groups_with_native_zeros():
    lin = _pruned_linear(8, 16, False, n=2, m=4)
    with torch.no_grad():
        lin.weight[0, :4] = 0  # a group with no survivors at all
        lin.weight[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 1.5])  # and one with a single survivor
    compact = NMSparseLinear.from_dense(lin.weight.detach(), None, 2, 4, torch.float32)
    assert torch.equal(_reload(compact).weight, lin.weight.detach())


def test_dense_layers_are_left_alone():
    lin = nn.Linear(64, 24)
    assert compact_layer(lin, "unstructured", torch.float16) is None  # no zeros: the bitmask would cost more


@pytest.mark.parametrize("symmetric", [False, True])
def test_sparse_quant_round_trip_and_shrink(symmetric):
    lin = _pruned_linear(24, 96, True, n=2, m=4)
    ql = QuantLinear.from_quantized(round_to_nearest(lin.weight.detach(), 4, 32, symmetric), lin.bias)
    compact = compact_layer(ql, "2:4", torch.float16)
    assert type(compact) is SparseQuantLinear
    assert torch.equal(compact.weight, ql.weight)  # RTN maps pruned zeros onto the zero point exactly
    assert torch.equal(_reload(compact).weight, ql.weight)
    assert compact.mask.numel() + compact.qvalues.numel() < 0.8 * ql.qweight.numel()  # ≈ 3 of 4 bits


@pytest.mark.slow
def test_real_model_sparse_artifact(fresh_default, tmp_path):
    """Magnitude 2:4 → RTN 4-bit (sparse + int4 by chaining), magnitude 50 % (bitmask) and SparseGPT joint
    2:4 + int4 on a few SmolLM2 layers (one calibration pass): saved compactly, smaller than the dense
    artifact, identical logits after reload."""
    lm = fresh_default
    dense_bytes = sum(t.numel() * 2 for t in {id(t): t for t in lm.model.state_dict().values()}.values())
    recipe = r"""
calibration: {n_samples: 4, seqlen: 64}
steps:
  - magnitude: {n: 2, m: 4, targets: 'layers\.0\.'}
  - rtn: {bits: 4, group_size: 128, symmetric: true, targets: 'layers\.0\.'}
  - magnitude: {sparsity: 0.5, targets: 'layers\.1\.mlp'}
  - sparsegpt: {n: 2, m: 4, bits: 4, group_size: 64, targets: 'layers\.2\.self_attn\.(k|v)_proj'}
"""
    res = slimlm.compress(lm, recipe, out=tmp_path / "art")
    layers = res.model.model.model.layers
    assert type(layers[0].mlp.up_proj) is SparseQuantLinear
    assert type(layers[1].mlp.down_proj) is SparseLinear
    assert type(layers[2].self_attn.k_proj) is SparseQuantLinear
    assert type(layers[3].mlp.up_proj) is nn.Linear
    assert ((layers[0].mlp.up_proj.weight != 0).reshape(1536, -1, 4).sum(2) <= 2).all()
    on_disk = (res.out / "model.safetensors").stat().st_size
    compact = [m for m in res.model.model.modules() if isinstance(m, (SparseLinear, SparseQuantLinear))]
    pruned_weights = sum(m.in_features * m.out_features for m in compact)
    assert on_disk < dense_bytes - pruned_weights // 2  # > 0.5 byte saved per compacted weight vs fp16 dense

    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = res.model.model(input_ids=ids).logits
        reloaded = slimlm.load(str(res.out))
        after = reloaded.model(input_ids=ids).logits
    assert type(reloaded.model.model.layers[1].mlp.down_proj) is SparseLinear
    assert torch.equal(before, after)
