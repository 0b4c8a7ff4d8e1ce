"""Every bad input gives one line naming the problem and the fix, exit code 2, and no partial output.

``CASES`` is the whole list (docs/robustness.md prints it with what each case says): the command line,
an optional set-up that plants the bad input, and a fragment of the one line expected. Each runs through
the real CLI in-process (``slimlm.cli.main``); a few more run ``slimlm`` as a subprocess, one of them
interrupted with SIGINT in the middle of writing its artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

import slimlm
from slimlm.cli import main

RTN1 = "steps: [{rtn: {bits: 4, targets: 'layers\\.0\\.mlp\\.down_proj$'}}]"  # one layer: quick
GPTQ = "steps: [{gptq: {bits: 4, targets: 'layers\\.0\\.mlp\\.down_proj$'}}]"


@dataclass
class Env:
    """What a case's set-up may use: its temporary folder and the shared small artifact."""

    tmp: Path
    artifact: Path
    config_json: Path
    monkeypatch: pytest.MonkeyPatch

    def recipe(self, text: str) -> None:
        (self.tmp / "r.yaml").write_text(text.replace("{tmp}", str(self.tmp)))

    def model_folder(self) -> Path:
        folder = self.tmp / "model"
        folder.mkdir(exist_ok=True)
        shutil.copy(self.config_json, folder / "config.json")
        save_file({"x": torch.zeros(4)}, str(folder / "model.safetensors"))
        return folder

    def art(self, copy_weights: bool = False) -> Path:
        """A private copy of the artifact (weights hard-linked unless the case edits them)."""
        dst = self.tmp / "art"
        shutil.copytree(self.artifact, dst, copy_function=shutil.copy2 if copy_weights else _link_or_copy)
        return dst

    def manifest(self, edit: Callable[[dict], object]) -> None:
        dst = self.art()
        path = dst / "slimlm.json"
        data = json.loads(path.read_text())
        edit(data)
        path.unlink()  # a new file: never write through the hard link
        path.write_text(json.dumps(data))


def _link_or_copy(src: str, dst: str) -> None:
    if src.endswith(".safetensors"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def _first_quant_layer(m: dict) -> dict:
    return next(iter(m["layers"].values()))


def _weights_tampered(env: Env, *, same_size: bool) -> None:
    w = env.art(copy_weights=True) / "model.safetensors"
    with open(w, "r+b") as f:
        if same_size:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\0" * 16)


def _two_words(env: Env) -> None:
    (env.tmp / "words.txt").write_text("hello world")


def _enospc(env: Env) -> None:
    """A full disk: the weights writer puts down a few bytes, then fails as a full disk does."""
    import errno

    import slimlm.artifact as artifact

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    env.monkeypatch.setattr(artifact, "save_file", full)
    env.recipe(RTN1)


def _evil_task(env: Env) -> None:
    (env.tmp / "evil.yaml").write_text("name: evil\ntype: perplexity\nreader: text\npath: x.txt\nprocess_doc: os:system\n")


EVAL = ["eval", "default", "--no-speed", "--data", "shakespeare"]
COMPRESS = ["compress", "default", "--recipe", "{tmp}/r.yaml", "--out", "{tmp}/out"]


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: str
    setup: Callable[..., None] | None = None
    smoke: bool = False  # needs no model: also run against the lowest supported transformers


def recipe_case(id: str, text: str, expect: str) -> Case:
    return Case(id, COMPRESS, expect, lambda env: env.recipe(text))


CASES = [
    # --- where the model comes from
    Case("missing path", ["eval", "{tmp}/nope"], "does not exist"),
    Case("folder without config.json", ["eval", "{tmp}"], "no config.json"),
    Case("folder without weights", ["eval", "{tmp}/model"], "no weight files",
         lambda env: (env.model_folder() / "model.safetensors").unlink()),
    Case("unknown architecture", ["eval", "{tmp}/model"], "unknown architecture 'bert'",
         lambda env: (env.model_folder() / "config.json").write_text(json.dumps({"model_type": "bert"}))),
    Case("truncated safetensors", ["eval", "{tmp}/model"], "not a valid safetensors file",
         lambda env: (lambda w: w.write_bytes(w.read_bytes()[:-8]))(env.model_folder() / "model.safetensors")),
    Case("pickle weights without --allow-pickle", ["eval", "{tmp}/model"], "--allow-pickle",
         lambda env: ((env.model_folder() / "model.safetensors").unlink(),
                      torch.save({"x": torch.zeros(1)}, env.tmp / "model" / "pytorch_model.bin"))),
    # --- CLI numbers and choices (argparse: one line, exit 2, before any work)
    Case("--window 0", [*EVAL, "--window", "0"], "argument --window: 0 is below the minimum of 2", smoke=True),
    Case("--window not a number", [*EVAL, "--window", "big"], "'big' is not a whole number", smoke=True),
    Case("--max-tokens negative", [*EVAL, "--max-tokens", "-5"], "-5 is below the minimum of 0", smoke=True),
    Case("--dtype unknown", [*EVAL, "--dtype", "int3"], "invalid choice: 'int3'", smoke=True),
    Case("tasks --limit 0", ["tasks", "default", "--tasks", "piqa", "--limit", "0"], "below the minimum of 1", smoke=True),
    Case("unknown CLI option", ["eval", "default", "--windw", "8"], "unrecognized arguments: --windw", smoke=True),
    # --- numbers that depend on the model or the text
    Case("--window past the model's context", [*EVAL, "--window", "100000"], "longer than the model's context of 8192"),
    Case("--max-tokens too few to score", [*EVAL, "--max-tokens", "50"], "leaves fewer than 100 tokens to score"),
    Case("two-word text file", ["eval", "default", "--no-speed", "--data", "{tmp}/words.txt"],
         "a perplexity needs at least 100", _two_words),
    Case("--device not a device", [*EVAL, "--device", "toaster"], "--device 'toaster' is not a device"),
    Case("--device absent CUDA index", [*EVAL, "--device", "cuda:99"], "--device cuda:99"),
    Case("missing data dir", ["eval", "default", "--no-speed", "--data", "wikitext2"], "SLIMLM_DATA_DIR",
         lambda env: env.monkeypatch.setenv("SLIMLM_DATA_DIR", str(env.tmp / "absent"))),
    # --- recipes (validated before the model loads; no output folder, no temp folder)
    recipe_case("recipe not YAML", "steps: [{rtn: {bits: 4}\n", "not valid YAML"),
    recipe_case("unknown method", "steps: [{rtm: {bits: 4}}]", "did you mean 'rtn'"),
    recipe_case("unknown option", "steps: [{rtn: {bitz: 4}}]", "unknown option 'bitz'"),
    recipe_case("bits out of range", "steps: [{rtn: {bits: 1}}]", "bits"),
    recipe_case("group size does not fit", "steps: [{rtn: {bits: 4, group_size: 100}}]", "group_size 100 does not fit"),
    recipe_case("targets match nothing", "steps: [{rtn: {targets: 'no_such_layer'}}]", "match no unconverted linear"),
    recipe_case("empty steps", "steps: []", "non-empty list"),
    recipe_case("unknown top-level key", "stepz: [{rtn: {}}]", "unknown top-level key"),
    recipe_case("options not a mapping", "steps: [{rtn: 4}]", "must be a mapping"),
    recipe_case("calibration n_samples 0", f"calibration: {{n_samples: 0}}\n{GPTQ}",
                "calibration: n_samples: Input should be greater than or equal to 1"),
    recipe_case("calibration batch_size 0", f"calibration: {{batch_size: 0}}\n{GPTQ}", "batch_size: Input should be greater than or equal to 1"),
    recipe_case("calibration seqlen 1", f"calibration: {{seqlen: 1}}\n{GPTQ}", "seqlen: Input should be greater than or equal to 2"),
    recipe_case("calibration seqlen past context", f"calibration: {{n_samples: 1, seqlen: 9000}}\n{GPTQ}",
                "calibration seqlen 9000 is longer than the model's context of 8192"),
    Case("calibration text too short", COMPRESS, "fewer than n_samples × seqlen",
         lambda env: (_two_words(env), env.recipe(f"calibration: {{source: '{{tmp}}/words.txt', n_samples: 2, seqlen: 64}}\n{GPTQ}"))),
    # --- the output folder
    Case("existing output folder", COMPRESS, "already exists", lambda env: (env.recipe(RTN1), (env.tmp / "out").mkdir())),
    Case("output path is a file", [*COMPRESS, "--overwrite"], "is a file",
         lambda env: (env.recipe(RTN1), (env.tmp / "out").write_text("mine"))),
    Case("unwritable output folder", ["compress", "default", "--recipe", "{tmp}/r.yaml", "--out", "/sys/slimlm-test/out"],
         "cannot write the artifact", lambda env: env.recipe(RTN1)),
    Case("disk full while writing", COMPRESS, "no space left on the device", _enospc),
    # --- artifacts whose manifest or weights were damaged or edited
    Case("manifest not JSON", ["eval", "{tmp}/art"], "slimlm.json is not valid JSON",
         lambda env: (lambda a: ((a / "slimlm.json").unlink(), (a / "slimlm.json").write_text("{oops")))(env.art())),
    Case("manifest not an object", ["eval", "{tmp}/art"], "is not a JSON object",
         lambda env: (lambda a: ((a / "slimlm.json").unlink(), (a / "slimlm.json").write_text("[1, 2]")))(env.art())),
    Case("manifest without layers", ["eval", "{tmp}/art"], "lacks 'layers'", lambda env: env.manifest(lambda m: m.pop("layers"))),
    Case("manifest without source hash", ["eval", "{tmp}/art"], "lacks the source model's 'hash'",
         lambda env: env.manifest(lambda m: m["source"].pop("hash"))),
    Case("layer entry without spec", ["eval", "{tmp}/art"], "needs a 'format' name and a 'spec' mapping",
         lambda env: env.manifest(lambda m: _first_quant_layer(m).pop("spec"))),
    Case("unknown layer format", ["eval", "{tmp}/art"], "unknown layer format 'quant9'",
         lambda env: env.manifest(lambda m: _first_quant_layer(m).update(format="quant9"))),
    Case("layer spec does not match the weights", ["eval", "{tmp}/art"], "does not match its manifest",
         lambda env: env.manifest(lambda m: _first_quant_layer(m)["spec"].update(bits=8))),
    Case("layer that the model does not have", ["eval", "{tmp}/art"], "does not fit this model",
         lambda env: env.manifest(lambda m: m["layers"].update({"model.layers.99.mlp.up_proj": _first_quant_layer(m)}))),
    Case("weights of another size", ["eval", "{tmp}/art"], "its manifest says", lambda env: _weights_tampered(env, same_size=False)),
    Case("weights edited in place", ["eval", "{tmp}/art"], "does not match the sha256", lambda env: _weights_tampered(env, same_size=True)),
    # --- task files
    Case("task YAML naming a module", ["tasks", "default", "--tasks", "{tmp}/evil.yaml"], "'os:system' is not a registered hook", _evil_task),
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real artifact, made once: the default model cut to 2 blocks, RTN-4 on every block linear."""
    from slimlm.methods.prune.layerdrop import drop_blocks

    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(2, lm.info.n_layers)))
    out = tmp_path_factory.mktemp("bad-input") / "art"
    slimlm.compress(lm, "steps:\n  - rtn: {bits: 4, group_size: 128}\n", out=out)
    return out


def run_cli(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".out", "out")))


def _params():
    for c in CASES:
        yield pytest.param(c, id=c.id, marks=[pytest.mark.smoke] if c.smoke else [])


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_line_exit_2(case: Case, capsys, tmp_path, monkeypatch, request) -> None:
    if case.setup is not None:
        art = request.getfixturevalue("artifact") if "{tmp}/art" in case.argv else Path("/nonexistent")
        config = Path(request.getfixturevalue("default_lm").info.weights_dir) / "config.json"
        case.setup(Env(tmp_path, art, config, monkeypatch))
    before = _leftovers(tmp_path)
    err = run_cli(capsys, [a.replace("{tmp}", str(tmp_path)) for a in case.argv])
    assert case.expect in err, err
    if "--out" in case.argv:
        assert _leftovers(tmp_path) == before  # no output folder, no temp folder left behind


def test_existing_output_is_kept_untouched(capsys, tmp_path) -> None:
    (tmp_path / "r.yaml").write_text(RTN1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    run_cli(capsys, [a.replace("{tmp}", str(tmp_path)) for a in COMPRESS])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.smoke
def test_debug_shows_the_underlying_traceback(capsys, tmp_path) -> None:
    assert main(["--debug", "eval", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("slimlm: error:") and "does not exist" in err
    assert main(["eval", str(tmp_path / "nope"), "--debug"]) == 2 and "Traceback" in capsys.readouterr().err


@pytest.mark.smoke
def test_unexpected_errors_are_one_line_too(capsys, monkeypatch) -> None:
    import slimlm.cli as cli

    def boom(args) -> None:
        raise ValueError("something slimlm did not foresee")

    monkeypatch.setattr(cli, "cmd_methods", boom)
    assert main(["methods"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error: ValueError" in err and "--debug" in err


def _slimlm(*argv: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "slimlm.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


@pytest.mark.smoke
def test_real_process_prints_one_line_and_exits_2() -> None:
    proc = _slimlm("eval", "default", "--window", "0")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines() == [
        "slimlm eval: error: argument --window: 0 is below the minimum of 2 — see `slimlm eval --help`"]


@pytest.mark.slow
def test_ctrl_c_while_writing_leaves_no_artifact(tmp_path) -> None:
    """SIGINT to a real `slimlm compress` as soon as its temporary folder appears: nothing is left."""
    (tmp_path / "r.yaml").write_text(RTN1)  # one layer: the run is mostly load and a ~270 MB write
    proc = _slimlm("compress", "default", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()):
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.002)
    else:
        proc.kill()
        pytest.fail(f"compress ended before writing began (rc {proc.poll()}): {proc.stderr.read()[-500:]}")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no out/, no .out.tmp-*/
