"""Every bad input gives one line naming the problem and the fix, exit code 2, and no partial output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimlm.cli import main


def run_cli(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def tiny_folder(tmp_path, default_lm) -> Path:
    """A folder with the default model's config and a small valid safetensors file."""
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(Path(default_lm.info.weights_dir) / "config.json", folder / "config.json")
    save_file({"x": torch.zeros(4)}, str(folder / "model.safetensors"))
    return folder


def write_recipe(tmp_path: Path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_missing_path(capsys, tmp_path) -> None:
    assert "does not exist" in run_cli(capsys, "eval", str(tmp_path / "nope"))


def test_folder_without_config(capsys, tmp_path) -> None:
    assert "no config.json" in run_cli(capsys, "eval", str(tmp_path))


def test_folder_without_weights(capsys, tiny_folder) -> None:
    (tiny_folder / "model.safetensors").unlink()
    assert "no weight files" in run_cli(capsys, "eval", str(tiny_folder))


def test_unknown_architecture(capsys, tiny_folder) -> None:
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    err = run_cli(capsys, "eval", str(tiny_folder))
    assert "unknown architecture 'bert'" in err and "arch.py" in err


def test_corrupt_safetensors(capsys, tiny_folder) -> None:
    data = (tiny_folder / "model.safetensors").read_bytes()
    (tiny_folder / "model.safetensors").write_bytes(data[: len(data) - 8])  # truncated
    assert "not a valid safetensors file" in run_cli(capsys, "eval", str(tiny_folder))


def test_pickle_refused_by_default(capsys, tiny_folder) -> None:
    (tiny_folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tiny_folder / "pytorch_model.bin")
    assert "--allow-pickle" in run_cli(capsys, "eval", str(tiny_folder))


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("steps: [{rtn: {bits: 4}\n", "not valid YAML"),
        ("steps: [{rtm: {bits: 4}}]", "did you mean 'rtn'"),
        ("steps: [{rtn: {bitz: 4}}]", "unknown option 'bitz'"),
        ("steps: [{rtn: {bits: 1}}]", "bits"),
        ("steps: [{rtn: {bits: 4, group_size: 100}}]", "group_size 100 does not fit"),
        ("steps: [{rtn: {targets: 'no_such_layer'}}]", "match no unconverted linear"),
        ("steps: []", "non-empty list"),
        ("stepz: [{rtn: {}}]", "unknown top-level key"),
        ("steps: [{rtn: 4}]", "must be a mapping"),
    ],
)
def test_bad_recipe_leaves_no_output(capsys, tmp_path, recipe: str, expected: str) -> None:
    out = tmp_path / "out"
    assert expected in run_cli(capsys, "compress", "default", "--recipe", write_recipe(tmp_path, recipe), "--out", str(out))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left behind


def test_existing_output_is_not_overwritten(capsys, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = run_cli(capsys, "compress", "default", "--recipe", write_recipe(tmp_path, "steps: [rtn]"), "--out", str(out))
    assert "already exists" in err and (out / "keep.txt").read_text() == "mine"


def test_missing_data_dir_names_the_variable(capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SLIMLM_DATA_DIR", str(tmp_path / "absent"))
    assert "SLIMLM_DATA_DIR" in run_cli(capsys, "eval", "default", "--data", "wikitext2", "--no-speed")
