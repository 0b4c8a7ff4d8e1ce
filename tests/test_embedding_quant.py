"""Embedding-table quantization: lookups match the dequantized table, the tied head shares its codes,
save → load is bit-identical, and the artifact shrinks by the table's share."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm.errors import SlimlmError
from slimlm.layers.embedding import QuantEmbedding, TiedQuantHead
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.methods.quant.embedding import quantize_table


@pytest.mark.parametrize("bits", [4, 8])
def test_lookup_and_head_match_dequantized_table(bits: int) -> None:
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))
    table, error = quantize_table(w, bits, 32, False, None)
    dense = table.weight  # (300, 64) dequantized
    assert error == pytest.approx(float((dense - w).pow(2).sum() / w.pow(2).sum()), rel=1e-4)
    step = table.scales.float()[..., None]  # (300, 2, 1): one grid step per group
    err = (dense - w).abs().view(300, 2, 32) / step
    # RTN: half a step inside the grid; the integer zero point may clip a group's extreme by < one step
    assert err.max() <= 1.0 and err.mean() < 0.3
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    assert torch.equal(table(ids), dense[ids])
    root = torch.nn.Module()
    root.emb = table
    head = TiedQuantHead.tie(root, "emb")
    x = torch.randn(2, 3, 64)
    assert torch.allclose(head(x), F.linear(x, dense), atol=1e-5)
    assert list(head.state_dict()) == []  # codes are stored once, in the embedding


def test_table_rounded_in_row_slices_equals_whole(monkeypatch) -> None:
    """Large tables are rounded a slice of rows at a time; the codes must not depend on the slicing."""
    import slimlm.methods.quant.embedding as embedding

    w = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    whole, err_whole = quantize_table(w, 4, 16, False, None)
    monkeypatch.setattr(embedding, "ROWS", 7)  # 50 rows = 7 slices, the last one partial
    sliced, err_sliced = quantize_table(w, 4, 16, False, None)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), sliced.state_dict().values()))
    assert err_sliced == pytest.approx(err_whole)


def test_embed_scale_is_kept() -> None:
    w = torch.randn(10, 16)
    plain, _ = quantize_table(w, 8, 16, False, None)
    scaled, _ = quantize_table(w, 8, 16, False, 4.0)
    ids = torch.arange(10)
    assert torch.allclose(scaled(ids), 4.0 * plain(ids))


def test_default_model_tied_table_round_trip_and_size(fresh_default, default_lm, tmp_path) -> None:
    lm = fresh_default
    drop_blocks(lm.model, lm.arch, set(range(2, lm.info.n_layers)))
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = lm.model(ids).logits
    out = tmp_path / "emb8"
    res = slimlm.compress(lm, "steps: [{embedding: {bits: 8}}]\n", out)
    assert isinstance(lm.model.get_input_embeddings(), QuantEmbedding)
    assert isinstance(lm.model.get_output_embeddings(), TiedQuantHead)
    assert res.reports[0].extra["tied"] is True
    with torch.no_grad():
        after = lm.model(ids).logits
    # 8-bit g128 table: logits move, but far less than their spread
    assert (after - before).abs().mean() < 0.05 * before.std()
    reloaded = slimlm.load(out)
    assert isinstance(reloaded.model.get_output_embeddings(), TiedQuantHead)
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, after)
    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["layers"]["lm_head"]["format"] == "tied_quant_head"
    # the fp16 table (56.6 MB) became 8-bit codes + g128 fp16 scales and uint8 zeros (≈29.0 MB)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("model.embed_tokens."))
    assert stored == 49152 * 576 + 49152 * 5 * 3


def test_bad_embedding_settings_are_refused(fresh_default) -> None:
    lm = fresh_default
    drop_blocks(lm.model, lm.arch, set(range(1, lm.info.n_layers)))
    with pytest.raises(SlimlmError, match="group_size 100 does not fit"):
        slimlm.compress(lm, "steps: [{embedding: {group_size: 100}}]\n")
    with pytest.raises(SlimlmError, match="already converted"):
        slimlm.compress(lm, "steps: [{embedding: {bits: 3}}, {embedding: {}}]\n")
    with pytest.raises(ValueError, match="whole bytes"):
        quantize_table(torch.randn(4, 6), 3, 6, False, None)  # 18 bits per row


def test_sliced_fill_matches_whole_layer_rounding(monkeypatch) -> None:
    import slimlm.methods.quant.embedding as embedding
    from slimlm.layers.quant import QuantLinear
    from slimlm.methods.quant.grid import round_to_nearest

    w = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    whole = QuantLinear.from_quantized(round_to_nearest(w, 4, 8, False), None)
    monkeypatch.setattr(embedding, "ROWS", 7)
    sliced = QuantLinear(16, 50, 4, 8, bias=False)
    err = embedding.fill_rows(sliced, w, False)
    assert torch.equal(sliced.qweight, whole.qweight) and torch.equal(sliced.scales, whole.scales)
    assert torch.equal(sliced.zeros, whole.zeros)
    assert err == pytest.approx(float((whole.weight - w).pow(2).sum() / w.pow(2).sum()), rel=1e-5)


def test_untied_head_is_quantized_as_its_own_layer(fresh_default, tmp_path) -> None:
    from slimlm.layers.quant import QuantLinear

    lm = fresh_default
    drop_blocks(lm.model, lm.arch, set(range(2, lm.info.n_layers)))
    emb = lm.model.get_input_embeddings()
    head = torch.nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
    head.weight = torch.nn.Parameter(emb.weight.detach() * 0.5 + 0.01)  # a head of its own
    lm.model.lm_head = head
    lm.model.config.tie_word_embeddings = False
    res = slimlm.compress(lm, "steps: [{embedding: {bits: 8}}]\n", tmp_path / "untied")
    qh = lm.model.get_output_embeddings()
    assert res.reports[0].extra["tied"] is False and type(qh) is QuantLinear and qh.bits == 8
    assert res.reports[0].layer_errors["lm_head"] < 1e-4  # 8-bit g128 codes of the head's own weights
    assert not torch.equal(qh.weight, lm.model.get_input_embeddings().rows(0, emb.num_embeddings, torch.float32))
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    reloaded = slimlm.load(tmp_path / "untied")
    assert type(reloaded.model.get_output_embeddings()) is QuantLinear
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, lm.model(ids).logits)
