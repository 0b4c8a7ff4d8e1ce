"""The spine on the real default model (SmolLM2-135M): driver, RTN quality floors, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm.artifact import WEIGHTS
from slimlm.calibrate import run_sequential
from slimlm.eval import perplexity
from slimlm.eval.run import evaluate
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.recipe import Recipe

# Measured on the first 4,096 WikiText-2 test tokens (512-token windows): fp32 27.25, RTN-8 per-channel
# 27.27 (+0.08%), RTN-4 g128 asym ≈ 35.8 (ratio 1.31). The floor leaves room for machine noise only.
RTN4_G128_RATIO_FLOOR = 1.40
EVAL_TOKENS = 4096


def _ppl(lm: slimlm.LoadedModel, text: str) -> float:
    return perplexity(lm.model, lm.tokenizer, text, window=512, add_bos=lm.info.add_bos,
                      max_tokens=EVAL_TOKENS, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def eval_text(request) -> str:
    try:
        return request.getfixturevalue("wikitext_eval")
    except pytest.skip.Exception:
        return request.getfixturevalue("shakespeare_eval")


@pytest.fixture(scope="module")
def fp_ppl(default_lm, eval_text) -> float:
    return _ppl(default_lm, eval_text)


def test_default_model_info(default_lm) -> None:
    info = default_lm.info
    assert (info.model_type, info.n_layers, info.add_bos) == ("llama", 30, False)
    assert 134_000_000 < info.n_params < 135_000_000


def test_gguf_is_cached_as_a_plain_fp32_checkpoint(default_lm) -> None:
    """Other tools (llama.cpp's converter, vLLM) read the cached folder: it must not claim GGUF quantization."""
    cfg = json.loads((Path(default_lm.info.weights_dir) / "config.json").read_text())
    assert cfg["dtype"] == "float32" and "quantization_config" not in cfg


def test_driver_reproduces_the_models_own_hidden_states(default_lm) -> None:
    """With no change to any block, the driver's block outputs equal the model's hidden states."""
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = default_lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    seen: dict[int, torch.Tensor] = {}

    def record(ctx) -> None:
        seen[ctx.index] = torch.cat(ctx.inputs)

    errors = run_sequential(default_lm.model, default_lm.arch, ids, record, batch_size=1)
    assert errors == {}  # nothing collected, nothing compared
    for i in (0, 1, 15, 29):
        assert torch.allclose(seen[i], hidden[i], atol=1e-4), i


@pytest.mark.parametrize("propagate", ["compressed", "reference"])
def test_driver_feeds_changed_or_reference_outputs_forward(fresh_default, propagate: str) -> None:
    """``compressed``: the next block sees the changed block's outputs; ``reference``: the unchanged model's."""
    lm = fresh_default
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    seen: dict[int, torch.Tensor] = {}

    def halve_down_proj(ctx) -> None:  # a visible "compression" of every block
        seen[ctx.index] = torch.cat(ctx.inputs)
        down = ctx.block.mlp.down_proj
        ctx.collect({"mlp.down_proj": down}, {"sq"})
        with torch.no_grad():
            down.weight.mul_(0.5)

    errors = run_sequential(lm.model, lm.arch, ids, halve_down_proj, batch_size=1, propagate=propagate)
    assert torch.allclose(seen[0], hidden[0], atol=1e-4)
    if propagate == "reference":
        assert errors == {}  # no changed-block forward, so nothing to compare
        assert all(torch.allclose(seen[i], hidden[i], atol=1e-4) for i in (1, 2, 29))
    else:
        assert len(errors) == lm.info.n_layers and min(errors.values()) > 0
        assert not torch.allclose(seen[2], hidden[2], atol=1e-2)


@pytest.mark.slow  # ~1 min each on 2 cores: a full-model compress plus 4,096 scored tokens
def test_rtn8_perplexity_within_one_percent(fresh_default, eval_text, fp_ppl) -> None:
    slimlm.compress(fresh_default, "steps: [{rtn: {bits: 8, group_size: -1}}]\n")
    assert _ppl(fresh_default, eval_text) / fp_ppl < 1.01


@pytest.mark.slow
def test_rtn4_g128_floor_round_trip_and_size(default_lm, fresh_default, eval_text, fp_ppl, tmp_path) -> None:
    out = tmp_path / "rtn4"
    res = slimlm.compress(fresh_default, "recipes/rtn4.yaml", out)
    ratio = _ppl(fresh_default, eval_text) / fp_ppl
    print(f"RTN-4 g128 perplexity ratio: {ratio:.4f}")
    assert 1.0 < ratio < RTN4_G128_RATIO_FLOOR

    reloaded = slimlm.load(out)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh_default.model(ids).logits, reloaded.model(ids).logits)

    fp_bytes = sum(p.stat().st_size for p in Path(default_lm.info.weights_dir).glob("*.safetensors"))
    assert (out / WEIGHTS).stat().st_size < 0.30 * fp_bytes

    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["source"]["hash"] == fresh_default.info.source_hash
    assert len(manifest["layers"]) == 30 * 7
    step = manifest["report"]["steps"][0]
    assert step["method"] == "rtn" and len(step["layer_errors"]) == 210
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()).steps[0].config.bits == 4
    assert res.reports[0].layer_errors == step["layer_errors"]


def test_recipe_yaml_round_trip() -> None:
    r = Recipe.from_yaml("calibration: {n_samples: 4}\nsteps:\n  - rtn: {bits: 3, group_size: 64, symmetric: true}\n")
    again = Recipe.from_yaml(r.to_yaml())
    assert again.to_dict() == r.to_dict()
    assert again.calibration.n_samples == 4 and again.steps[0].config.symmetric is True


def test_eval_rows_have_provenance(fresh_default) -> None:
    lm = fresh_default
    drop_blocks(lm.model, lm.arch, set(range(2, lm.info.n_layers)))  # speed rows on 2 real blocks: seconds, not minutes
    rows = evaluate(lm, data="shakespeare", max_tokens=600, speed=True, progress=False)
    quality, eff = rows
    assert quality["kind"] == "quality" and quality["perplexity"] > 1
    assert eff["decode_tok_s"] > 0 and eff["ttft_s"] > 0 and eff["bytes_on_disk"] > 5e8
    for r in rows:
        assert {"machine", "versions", "timestamp", "git_hash", "recipe"} <= set(r)


def test_cli_eval_json_lines(capsys, tmp_path) -> None:
    from slimlm.cli import main

    results = tmp_path / "r.jsonl"
    assert main(["eval", "default", "--json", "--data", "shakespeare", "--max-tokens", "300", "--no-speed",
                 "--results", str(results)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1 and lines[0]["kind"] == "quality" and lines[0]["perplexity"] > 1
    assert json.loads(results.read_text().splitlines()[0])["perplexity"] == lines[0]["perplexity"]
