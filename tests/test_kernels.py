"""Each engine kernel equals its format's dequantized reference (x @ Wᵀ in fp32) within a stated tolerance.

Tolerance: the int kernels run bf16 activations and bf16 scales/zeros, so the output may differ from
the fp32 reference by ~2⁻⁸ relative; we require ‖y − y_ref‖ / ‖y_ref‖ ≤ 1.5 % (measured ≈ 0.3–0.6 %).
Dense/dequantized paths in fp32 must match to 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimlm.layers.embedding import QuantEmbedding
from slimlm.layers.int8 import Int8Linear
from slimlm.layers.lowrank import LowRankLinear
from slimlm.layers.nf4 import NF4Linear
from slimlm.layers.quant import QuantizedWeight, QuantLinear
from slimlm.layers.sparse import SparseLinear
from slimlm.methods.quant.grid import round_to_nearest
from slimlm.methods.quant.nf4 import nf4_quantize
from slimlm.runtime.kernels import build_kernel, kernel_group

CPU = torch.device("cpu")
BF16_TOL = 0.015


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def quant_layer(out_f: int, in_f: int, bits: int, group: int, symmetric: bool = False, seed: int = 0) -> QuantLinear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    return QuantLinear.from_quantized(round_to_nearest(w, bits, group, symmetric), None)


@torch.no_grad()
def check(mods: list[nn.Module], path: str, tol: float = BF16_TOL, dtype: torch.dtype = torch.bfloat16) -> float:
    x = torch.randn(3, 5, mods[0].in_features, generator=torch.Generator().manual_seed(1))
    ref = torch.cat([x @ m.weight.float().t() + (m.bias.float() if getattr(m, "bias", None) is not None else 0) for m in mods], -1)
    k = build_kernel(mods, dtype, CPU)
    assert k.path == path
    y = k(x.to(dtype))
    assert y.dtype == dtype and y.shape == ref.shape
    err = rel_err(y, ref)
    assert err <= tol, (path, err)
    return err


def test_kernel_group_reexpresses_groups_exactly() -> None:
    assert kernel_group(128, 576) == 64  # SmolLM2's K at g128 → g64 groups, scales repeated
    assert kernel_group(576, 576) == 64  # per channel on K = 576
    assert kernel_group(32, 640) == 32 and kernel_group(128, 640) == 128
    assert kernel_group(48, 96) is None  # no power-of-two tiling → dequantized path


def test_int4_known_answer() -> None:
    """One group of 32 codes with scale 0.5 and zero 3: w = 0.5·(q − 3); x = ones → Σ_k w exactly."""
    q = torch.arange(32).remainder(16)[None].repeat(16, 1)
    qw = QuantizedWeight(q, torch.full((16, 1), 0.5, dtype=torch.float16), torch.full((16, 1), 3, dtype=torch.uint8), 4, 32)
    k = build_kernel([QuantLinear.from_quantized(qw, None)], torch.bfloat16, CPU)
    assert k.path == "int4pack"
    expected = 0.5 * float((q[0] - 3).sum())  # 0.5 · (2·120 − 96) = 72
    assert torch.equal(k(torch.ones(1, 32, dtype=torch.bfloat16)), torch.full((1, 16), expected, dtype=torch.bfloat16))


@pytest.mark.parametrize("in_f,group,symmetric", [(64, 32, False), (576, 128, False), (576, 64, True), (256, 256, False),
                                                  (576, -1, False)])
def test_int4pack_matches_dequantized(in_f: int, group: int, symmetric: bool) -> None:
    layer = quant_layer(48, in_f, 4, in_f if group == -1 else group, symmetric)
    check([layer], "int4pack")


def test_int4pack_fuses_qkv_with_bias_and_fp32_engine() -> None:
    mods = [quant_layer(n, 128, 4, 64, seed=i) for i, n in enumerate((64, 32, 32))]
    mods[1].bias = nn.Parameter(torch.randn(32))
    check(mods, "int4pack")
    check(mods, "int4pack", dtype=torch.float32)  # fp32 engine: bf16 inside the kernel only


@pytest.mark.parametrize("group", [-1, 128])
def test_int8pack_matches_dequantized(group: int) -> None:
    layer = quant_layer(48, 576, 8, 576 if group == -1 else group)
    assert int(layer.zeros.ne(128).sum()) > 0  # asymmetric zero points exercise the folded correction
    check([layer], "int8pack", tol=0.01)


def test_int8linear_runs_weight_only() -> None:
    check([Int8Linear.from_linear(torch.randn(32, 64), torch.randn(32))], "int8pack", tol=0.01)


def test_tied_8bit_table_as_head() -> None:
    table = QuantEmbedding(64, 96, 8, 32)
    qw = round_to_nearest(torch.randn(96, 64), 8, 32, False)
    filled = QuantLinear.from_quantized(qw, None)
    table.qweight, table.scales, table.zeros = filled.qweight, filled.scales, filled.zeros
    check([table], "int8pack", tol=0.01)


def test_formats_without_kernel_take_the_cached_dequantized_path() -> None:
    nf4 = NF4Linear(64, 32, bias=False)
    for name, t in nf4_quantize(torch.randn(32, 64)).items():
        setattr(nf4, name, t)
    w = torch.randn(32, 64)
    w[w.abs() < 0.7] = 0
    sparse = SparseLinear.from_dense(w, None, torch.float16)
    three_bit = quant_layer(32, 64, 3, 32)
    for layer in (nf4, sparse, three_bit):
        check([layer], "dequantized", tol=1e-5, dtype=torch.float32)
        check([layer], "dequantized", tol=0.01)


def test_lowrank_runs_both_factors_through_their_own_kernels() -> None:
    lr = LowRankLinear.from_factors(torch.randn(16, 64), torch.randn(32, 16), torch.randn(32))
    check([lr], "lowrank(dense+dense)", tol=1e-5, dtype=torch.float32)
    lr.first = quant_layer(16, 64, 4, 32)
    check([lr], "lowrank(int4pack+dense)")


def test_dense_fp32_reuses_the_weight() -> None:
    lin = nn.Linear(64, 32)
    check([lin], "dense", tol=1e-6, dtype=torch.float32)


def test_real_model_int4_and_nf4_layers_match_their_reference(capsys) -> None:
    """SmolLM2 (4 blocks): RTN-4 g128 on K = 576 runs int4pack (as g64 groups) and an NF4 layer the cached
    dequantized path with a one-line notice; engine logits track the model's own (dequantizing) forward."""
    import slimlm
    from slimlm.methods.prune.layerdrop import drop_blocks
    from slimlm.models.arch import block_linears, blocks, set_module
    from slimlm.runtime.engine import Engine

    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(4, lm.info.n_layers)))
    for block in blocks(lm.model, lm.arch):
        for path, lin in block_linears(block, lm.arch).items():
            set_module(block, path, QuantLinear.from_quantized(round_to_nearest(lin.weight.detach(), 4, 128, False), None))
    down = blocks(lm.model, lm.arch)[0].mlp.down_proj
    nf4 = NF4Linear(down.in_features, down.out_features, bias=False)
    for name, t in nf4_quantize(down.weight.detach()).items():
        setattr(nf4, name, t)
    blocks(lm.model, lm.arch)[0].mlp.down_proj = nf4
    eng = Engine(lm)
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "dequantized" in notice  # one line naming the path taken
    assert eng.dtype == torch.bfloat16 and eng.paths == {"int4pack": 4 * 4 - 1, "dequantized": 1, "dense": 1}
    ids = torch.tensor([eng.encode("The quick brown fox jumps over the lazy dog because it wants to")])
    with torch.no_grad():
        ref = lm.model(ids).logits
    eng.reset(1)
    got = eng.forward(ids)
    assert rel_err(got, ref) < 0.03
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.85
