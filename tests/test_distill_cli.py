"""`slimlm distill` and the `distill` recipe step, end to end on the default model."""

from __future__ import annotations

import pytest
import torch

import slimlm
from slimlm.cli import main

TINY = "{n_samples: 4, seqlen: 64}"


def test_cli_needs_exactly_one_student(tmp_path, capsys) -> None:
    assert main(["distill", "--teacher", "default", "--out", str(tmp_path / "s")]) == 2
    assert "exactly one of --student or --student-recipe" in capsys.readouterr().err


@pytest.mark.slow
def test_recipe_step_distills_from_the_source_model(fresh_default) -> None:
    recipe = (f"calibration: {TINY}\nsteps:\n  - layer_drop: {{n: 28}}\n"
              "  - distill: {loss: jsd, steps: 3, batch_size: 2, seq_len: 64, lr: 0.001}\n")
    res = slimlm.compress(fresh_default, recipe)
    report = res.reports[1].extra
    assert res.model.info.n_layers == 2 and report["teacher"] == "default"
    assert report["tokens"] == 3 * 2 * 64 and report["last_loss"] < report["first_loss"]


@pytest.mark.slow
def test_cli_student_recipe_lora_writes_artifact_and_adapters(tmp_path, capsys) -> None:
    recipe = tmp_path / "drop.yaml"
    recipe.write_text(f"calibration: {TINY}\nsteps:\n  - layer_drop: {{n: 28}}\n")
    out = tmp_path / "student"
    rc = main(["distill", "--teacher", "default", "--student-recipe", str(recipe), "--loss", "fkl", "--steps", "2",
               "--batch-size", "1", "--seq-len", "32", "--lora-r", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "artifact written to" in capsys.readouterr().out
    assert (tmp_path / "student.lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "student.ckpt").is_dir()
    lm = slimlm.load(out)
    assert lm.info.n_layers == 2 and "distilled from default" in (lm.info.recipe or "")


@pytest.mark.slow
@pytest.mark.parametrize("lora", ["", ", lora_r: 4"])
def test_recovery_after_pruning_keeps_the_pruned_weights_zero(fresh_default, lora) -> None:
    """Full fine-tuning and merged LoRA both update the kept weights only: the layer still stores compactly."""
    recipe = (f"calibration: {TINY}\nsteps:\n  - layer_drop: {{n: 28}}\n"
              "  - wanda: {sparsity: 0.5, targets: 'layers\\.0\\.mlp'}\n"
              f"  - distill: {{loss: fkl, steps: 2, batch_size: 1, seq_len: 32, lr: 0.01{lora}}}\n")
    pruned = slimlm.compress(slimlm.load("default"), recipe.rsplit("  - distill", 1)[0]).model.model
    res = slimlm.compress(fresh_default, recipe)
    for name in ("gate_proj", "up_proj", "down_proj"):
        before = pruned.get_submodule(f"model.layers.0.mlp.{name}")
        after = res.model.model.get_submodule(f"model.layers.0.mlp.{name}")
        assert after.format == "sparse_linear" and after.nnz == before.nnz == after.in_features * after.out_features // 2
        assert torch.equal(after.mask, before.mask)  # same kept positions
        assert not torch.equal(after.values, before.values)  # which did train
