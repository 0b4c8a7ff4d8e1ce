"""Per-layer sensitivity (one layer quantized at a time) and mixed-precision recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm.cli import main
from slimlm.errors import SlimlmError
from slimlm.layers.quant import QuantLinear
from slimlm.recipe import Recipe
from slimlm.sensitivity import layer_sensitivity

FEW = r"layers\.(0|29)\.(self_attn\.k_proj|mlp\.down_proj)"


def test_sensitivity_scores_are_monotone_in_bits_and_leave_the_model_unchanged(fresh_default) -> None:
    lm = fresh_default
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    s2 = layer_sensitivity(lm, bits=2, group_size=64, targets=FEW, n_windows=2, seqlen=64, progress=False)
    s8 = layer_sensitivity(lm, bits=8, group_size=64, targets=FEW, n_windows=2, seqlen=64, progress=False)
    assert set(s2) == set(s8) and len(s2) == 4
    assert list(s2.values()) == sorted(s2.values(), reverse=True)  # ranked, most sensitive first
    for name in s2:
        assert s2[name] > s8[name] >= 0.0  # KL: fewer bits, larger change of the output distribution
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sensitivity_by_block_with_gptq_and_nll(default_lm) -> None:
    scores = layer_sensitivity(default_lm, bits=3, group_size=128, method="gptq", metric="nll", unit="block",
                               targets=r"layers\.(1|2)\.mlp", n_windows=2, seqlen=64, progress=False)
    assert set(scores) == {"model.layers.1", "model.layers.2"}
    assert all(v == v for v in scores.values())  # finite numbers, not NaN


def test_sensitivity_cli_json_and_table(capsys) -> None:
    assert main(["sensitivity", "default", "--bits", "3", "--targets", r"layers\.5\.self_attn\.(q|v)_proj",
                 "--windows", "2", "--seqlen", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bits"] == 3 and set(out["scores"]) == {"model.layers.5.self_attn.q_proj", "model.layers.5.self_attn.v_proj"}
    assert main(["sensitivity", "default", "--targets", r"layers\.5\.self_attn\.q_proj", "--windows", "2", "--seqlen", "64"]) == 0
    assert "| 1 | model.layers.5.self_attn.q_proj |" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, expected", [
    ({"method": "awq"}, "unknown method 'awq'"),
    ({"bits": 9}, "9 bits is not supported"),
    ({"metric": "mse"}, "metric 'mse'"),
    ({"targets": "nothing_here"}, "match no unconverted linear layer"),
    ({"group_size": 100}, "group_size 100 does not fit"),
])
def test_sensitivity_bad_input(default_lm, kwargs, expected) -> None:
    with pytest.raises(SlimlmError, match=expected):
        layer_sensitivity(default_lm, **kwargs)


def test_sensitivity_cli_bad_input_is_one_line(capsys) -> None:
    assert main(["sensitivity", "default", "--method", "nope"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == ["slimlm: error: sensitivity: unknown method 'nope' — use one of rtn, gptq"]


def test_mixed_precision_first_step_wins(fresh_default, tmp_path) -> None:
    recipe = ('steps:\n  - rtn: {bits: 8, group_size: 128, targets: "layers\\\\.0\\\\.|down_proj"}\n'
              '  - rtn: {bits: 3, group_size: 64, symmetric: true}\n')
    res = slimlm.compress(fresh_default, recipe, tmp_path / "mixed")
    bits = {n: m.bits for n, m in res.model.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(bits) == 30 * 7
    for name, b in bits.items():
        assert b == (8 if ".layers.0." in name or name.endswith("down_proj") else 3), name
    assert [len(r.layer_errors) for r in res.reports] == [7 + 29, 30 * 7 - 7 - 29]
    reloaded = slimlm.load(str(res.out)).model
    assert {n: m.bits for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)} == bits


def test_shipped_mixed_recipe_parses() -> None:
    recipe = Recipe.load(Path(__file__).resolve().parents[1] / "recipes" / "mixed.yaml")
    assert [s.method for s in recipe.steps] == ["rtn", "gptq"]
    assert recipe.steps[0].config.bits == 8 and recipe.steps[1].config.bits == 4
