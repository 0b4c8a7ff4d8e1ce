"""NF4 (double-quantized) and ternary: codebook, round-trip bounds, codes, contract, bad input."""

from __future__ import annotations

import pytest
import torch

import slimlm
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.errors import SlimlmError
from slimlm.layers.nf4 import NF4Linear, dequantize_absmax, nf4_codebook
from slimlm.layers.quant import QuantLinear
from slimlm.methods.quant.nf4 import double_quantize, nf4_quantize
from slimlm.methods.quant.ternary import ternary_quantize

# bitsandbytes' published NF4 table (functional.py, get_4bit_type("nf4"))
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def truncate(lm: slimlm.LoadedModel, n: int = 2) -> slimlm.LoadedModel:
    """Keep the first ``n`` decoder blocks of a private model copy (fast, still real weights)."""
    drop_blocks(lm.model, lm.arch, set(range(n, lm.info.n_layers)))
    return lm


def test_nf4_codebook_matches_published_table() -> None:
    assert torch.allclose(nf4_codebook(), torch.tensor(NF4_TABLE), atol=1e-6)


def test_double_quant_round_trip_bounded() -> None:
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.01
    q, scale, offset = double_quantize(absmax, 256)
    assert q.dtype == torch.int8 and scale.numel() == 4 and offset.numel() == 1
    err = (dequantize_absmax(q, scale, offset, 256) - absmax).abs()
    assert (err <= scale.repeat_interleave(256)[:1000] / 2 + 1e-7).all()


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_round_trip_error_bounded(double_quant: bool) -> None:
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.02
    layer = NF4Linear(128, 48, False, 64, double_quant, 256)
    for key, t in nf4_quantize(w, 64, double_quant, 256).items():
        setattr(layer, key, t)
    book = nf4_codebook()
    half_gap = float((book[1:] - book[:-1]).max()) / 2
    absmax = w.reshape(-1, 64).abs().amax(1)
    dq_absmax = layer.block_absmax()
    err = (layer.weight - w).reshape(-1, 64).abs()
    # rounding to the nearest level (≤ half the widest gap) plus the absmax's own quantization error
    assert (err <= half_gap * dq_absmax[:, None] + (dq_absmax - absmax).abs()[:, None] + 1e-7).all()
    assert float((layer.weight - w).pow(2).mean() / w.pow(2).mean()) < 0.012
    bpw = layer.bits_per_weight()
    assert (4.12 < bpw < 4.14) if double_quant else bpw == pytest.approx(4.5)


def test_ternary_codes_and_absmean_known_answer() -> None:
    w = torch.tensor([[0.1, -2.0, 0.9, 0.05], [0.0, 0.0, 0.0, 0.0]])
    qw = ternary_quantize(w, group_size=4)
    t = qw.q.long() - qw.zero.long()
    assert t.tolist() == [[0, -1, 1, 0], [0, 0, 0, 0]]
    assert float(qw.scale[0, 0]) == pytest.approx(0.7625, rel=1e-3)  # mean |w| of row 0
    big = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    codes = ternary_quantize(big, 32)
    assert set((codes.q.long() - 1).unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("recipe, fmt", [("nf4: {}", NF4Linear), ("ternary: {group_size: 64}", QuantLinear)])
def test_contract_save_reload_identical_logits(fresh_default, tmp_path, recipe, fmt) -> None:
    lm = truncate(fresh_default, 2)
    ids = lm.tokenizer("Valkyria Chronicles III is a tactical role-playing game.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = lm.model(ids).logits
    res = slimlm.compress(lm, f"steps:\n  - {recipe}\n", out=tmp_path / "art")
    assert isinstance(lm.model.model.layers[1].mlp.down_proj, fmt)
    again = slimlm.load(str(tmp_path / "art"))
    with torch.no_grad():
        out = lm.model(ids).logits
        assert torch.equal(out, again.model(ids).logits)
    if fmt is NF4Linear:
        assert 4.12 < res.reports[0].extra["bits_per_weight"] < 4.14
        assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.05


def test_nf4_then_chained_after_rtn(fresh_default) -> None:
    lm = truncate(fresh_default, 1)
    slimlm.compress(lm, "steps:\n  - rtn: {bits: 8, targets: 'o_proj'}\n  - nf4: {}\n")
    assert isinstance(lm.model.model.layers[0].self_attn.o_proj, QuantLinear)
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, NF4Linear)


@pytest.mark.parametrize("step, match", [
    ("nf4: {bits: 3}", "bits must be 4"),
    ("nf4: {block_size: 100}", "powers of two"),
    ("ternary: {group_size: 100}", "group_size 100"),
    ("nf4: {targets: nothing_here}", "match no"),
    ("ternary: {targets: nothing_here}", "match no"),
])
def test_bad_input(fresh_default, step: str, match: str) -> None:
    with pytest.raises(SlimlmError, match=match):
        slimlm.compress(truncate(fresh_default, 1), f"steps:\n  - {step}\n")


@pytest.mark.parametrize("method", ["nf4", "ternary"])
def test_non_finite_weights_rejected(fresh_default, method: str) -> None:
    lm = truncate(fresh_default, 1)
    with torch.no_grad():
        lm.model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("inf")
    with pytest.raises(SlimlmError, match="NaN or inf"):
        slimlm.compress(lm, f"steps:\n  - {method}: {{}}\n")
