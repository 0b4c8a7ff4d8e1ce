"""Layer drop (ShortGPT Block Influence) and width pruning on the real default model.

The structurally pruned artifacts must reload with plain ``transformers`` (no slimlm code) and give
the same logits as slimlm's in-memory result, including incremental decoding with a KV cache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import slimlm
from slimlm.config import CalibrationConfig
from slimlm.data import calibration_ids
from slimlm.errors import SlimlmError
from slimlm.methods.prune.width import WidthConfig, group_importance, neuron_importance, plan_width
from slimlm.models.arch import blocks
from slimlm.models.compat import cache_kwargs, output_cache
from slimlm.models.load import count_params

CALIB = "calibration: {n_samples: 4, seqlen: 64, batch_size: 4}\n"
PROMPT = torch.tensor([[1, 504, 3158, 282, 260, 1345, 30, 2, 9, 100, 4124, 28]])


def recipe(step: str) -> str:
    return CALIB + f"steps:\n  - {step}\n"


@torch.no_grad()
def assert_plain_reload_matches(lm: slimlm.LoadedModel, folder) -> AutoModelForCausalLM:
    """Plain from_pretrained: fp32 (upcast from fp16 storage), tied head, same logits and cached decoding."""
    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    assert plain.dtype == torch.float32
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(plain(input_ids=PROMPT).logits, lm.model(input_ids=PROMPT).logits, rtol=0, atol=1e-5)
    ours = lm.model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    theirs = plain.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)
    # KV-cache indexing after renumbering: cached decoding equals a full forward on the same tokens
    full = plain(input_ids=theirs[:, :-1]).logits[:, -1]
    past = output_cache(plain(input_ids=theirs[:, :-2], use_cache=True))
    step = plain(input_ids=theirs[:, -2:-1], **cache_kwargs(plain, past), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-4)
    return plain


@pytest.mark.slow
@torch.no_grad()
def test_layer_drop_removes_identity_block_and_reloads_plain(fresh_default, tmp_path):
    model, cfg = fresh_default.model, fresh_default.model.config
    ident = 7  # make block 7 an exact identity: zero its attention and MLP output projections
    blk = blocks(model, fresh_default.arch)[ident]
    blk.self_attn.o_proj.weight.zero_()
    blk.mlp.down_proj.weight.zero_()
    ids = calibration_ids(fresh_default.tokenizer, CalibrationConfig(n_samples=4, seqlen=64))
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    ref_logits = model(input_ids=PROMPT).logits
    n_before = len(blocks(model, fresh_default.arch))

    result = slimlm.compress(fresh_default, recipe("layer_drop: {n: 1}"), out=tmp_path / "ld")
    extra = result.reports[0].extra
    bi = list(extra["block_influence"].values())
    assert extra["dropped"] == [ident]
    assert abs(bi[ident]) < 1e-5 and min(b for i, b in enumerate(bi) if i != ident) > 1e-3
    for i in (0, 12, 28):  # matches 1 − cos computed directly from transformers' hidden states
        direct = 1 - F.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean()
        assert bi[i] == pytest.approx(float(direct), abs=1e-4)

    assert cfg.num_hidden_layers == n_before - 1 == len(blocks(model, fresh_default.arch))
    assert [b.self_attn.layer_idx for b in blocks(model, fresh_default.arch)] == list(range(n_before - 1))
    # dropping an identity block changes nothing but fp16 storage rounding
    torch.testing.assert_close(model(input_ids=PROMPT).logits, ref_logits, rtol=0, atol=0.05)
    plain = assert_plain_reload_matches(result.model, result.out)
    assert plain.config.num_hidden_layers == n_before - 1


@pytest.mark.slow
def test_width_prunes_whole_kv_groups_and_reloads_plain(fresh_default, tmp_path):
    before = count_params(fresh_default.model)
    result = slimlm.compress(fresh_default, recipe("width: {mlp_ratio: 0.75, heads_ratio: 0.67}"), out=tmp_path / "w")
    cfg = result.model.model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (1152, 6, 2, 64)
    attn = blocks(result.model.model, result.model.arch)[3].self_attn
    assert attn.q_proj.weight.shape == (384, 576) and attn.k_proj.weight.shape == (128, 576)
    assert attn.o_proj.weight.shape == (576, 384)
    removed = 30 * (384 * 576 * 3 + 2 * (3 * 64) * 576 + 2 * 64 * 576)  # 384 MLP neurons + one KV group (q, o; k, v) per block
    assert before - count_params(result.model.model) == removed
    plain = assert_plain_reload_matches(result.model, result.out)
    assert plain.model.layers[0].mlp.down_proj.in_features == 1152


def test_width_plan_meets_param_budget(default_lm):
    keep_n, keep_g = plan_width(WidthConfig(param_reduction=0.25), default_lm.model, default_lm.arch, 3)
    per_layer = keep_n * 3 * 576 + keep_g * (3 * 64 * 576 * 2 + 64 * 576 * 2)
    total = count_params(default_lm.model)
    after = total - 30 * (1536 * 3 * 576 + 3 * (3 * 64 * 576 * 2 + 64 * 576 * 2)) + 30 * per_layer
    assert 1 - after / total == pytest.approx(0.25, abs=0.002)
    assert keep_n < 1536
    only_mlp = plan_width(WidthConfig(param_reduction=0.25, heads_ratio=1.0), default_lm.model, default_lm.arch, 3)
    assert only_mlp[1] == 3 and only_mlp[0] < keep_n


def test_importance_kernels_known_answers():
    w_down = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])  # (hidden 2, inter 3)
    sq = torch.tensor([4.0, 1.0, 0.25])
    assert torch.equal(neuron_importance(w_down, sq), torch.tensor([4.0, 9.0, 1.0]))
    # two groups of 2 channels; group 1's channels see 10× larger activations
    w_o = torch.ones(3, 4)
    x = torch.tensor([[1.0, 1.0, 10.0, 10.0]])
    imp = group_importance(w_o, x.T @ x, 2)
    assert torch.allclose(imp, torch.tensor([3 * 2.0**2, 3 * 20.0**2]))


@pytest.mark.parametrize("step, message", [
    ("layer_drop: {n: 30}", "would remove all 30 blocks"),
    ("layer_drop: {n: 45}", "would remove all 30 blocks"),
    ("layer_drop: {fraction: 0.99}", "would remove all 30 blocks"),
    ("layer_drop: {fraction: 0.01}", "removes no block"),
    ("layer_drop: {fraction: 1.0}", "fraction"),
    ("layer_drop: {fraction: 0}", "fraction"),
    ("layer_drop: {}", "exactly one of n"),
    ("layer_drop: {n: 2, fraction: 0.1}", "exactly one of n"),
    ("width: {heads_ratio: 0.1}", "keeps none of the 3 KV groups"),
    ("width: {mlp_ratio: 0.0001}", "keeps none of the 1536 MLP neurons"),
    ("width: {mlp_ratio: 0}", "mlp_ratio"),
    ("width: {param_reduction: 0.9}", "needs more than every MLP neuron"),
    ("width: {param_reduction: 1.5}", "param_reduction"),
    ("width: {param_reduction: 0.2, mlp_ratio: 0.5}", "drop mlp_ratio"),
    ("width: {}", "give param_reduction"),
])
def test_bad_structured_input(default_lm, step, message):
    with pytest.raises(SlimlmError, match=message):  # raised before the model is touched
        slimlm.compress(default_lm, recipe(step))
    assert default_lm.model.config.num_hidden_layers == 30 and default_lm.model.config.intermediate_size == 1536
