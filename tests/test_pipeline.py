"""Pipeline fixes on tiny random-initialised models: pruning marks travel with their modules, one
finalisation path for compress and distill, a dense student trained before packing, statistics
shared by same-input groups, block influence in one pass, BOS and multimodal facts at load time."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import slimlm
from slimlm.calibrate import driver
from slimlm.cli import main
from slimlm.compress import run_steps, step_context
from slimlm.errors import SlimlmError
from slimlm.layers.sparse import SparseLinear, compact_sparse
from slimlm.methods.prune.layerdrop import drop_blocks
from slimlm.models.arch import block_linears, blocks
from slimlm.recipe import Recipe

sys.path.insert(0, str(Path(__file__).parent))
from test_families import make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    get, root = make_tiny(tmp_path_factory.mktemp("tiny-pipe"))
    return get, root, f"calibration: {{source: {root / 'text.txt'}, n_samples: 4, seqlen: 32}}\n"


@pytest.fixture
def llama4(tiny, tmp_path):
    """A 4-block tiny llama saved as a folder (blocks are what layer drop removes)."""
    from tiny_models import VARIANTS, build, char_tokenizer

    get, root, _ = tiny
    VARIANTS["llama-4-blocks"] = ("llama", {"num_hidden_layers": 4})  # not "llama4": that is a real (MoE) model type
    try:
        folder = build("llama-4-blocks", tmp_path / "llama4", char_tokenizer((root / "text.txt").read_text()))
    finally:
        del VARIANTS["llama-4-blocks"]
    return folder


def sparse_layers(model: nn.Module, arch) -> set[str]:
    return {f"{i}.{p}" for i, b in enumerate(blocks(model, arch)) for p, m in block_linears(b, arch).items()
            if isinstance(m, SparseLinear)}


def test_pruning_marks_follow_their_layers_through_layer_drop(tiny, llama4) -> None:
    """wanda on block 3 only, then block 0 removed: block 3 is now block 2, and it is the one compacted."""
    _, _, cal = tiny
    lm = slimlm.load(llama4)
    recipe = Recipe.from_yaml(cal + "steps: [{wanda: {sparsity: 0.5, targets: 'layers\\.3\\.'}}]\n")
    run_steps(step_context(lm, recipe), recipe.steps)
    drop_blocks(lm.model, lm.arch, {0})
    compact_sparse(lm.model)
    assert sparse_layers(lm.model, lm.arch) == {f"2.{p}" for p in block_linears(blocks(lm.model, lm.arch)[2], lm.arch)}


def test_wanda_then_layer_drop_recipe_compacts_exactly_the_pruned_layers(tiny, llama4, tmp_path) -> None:
    _, _, cal = tiny
    lm = slimlm.load(llama4)
    res = slimlm.compress(lm, cal + "steps:\n  - wanda: {sparsity: 0.5, targets: 'layers\\.[123]\\.'}\n"
                          "  - layer_drop: {n: 1}\n", tmp_path / "out")
    dropped = res.reports[1].extra["dropped"][0]
    kept_old = [i for i in range(4) if i != dropped]
    pruned_now = {new for new, old in enumerate(kept_old) if old in (1, 2, 3)}
    got = sparse_layers(res.model.model, res.model.arch)
    assert {int(k.split(".")[0]) for k in got} == pruned_now and len(got) == 7 * len(pruned_now)
    assert sparse_layers(slimlm.load(tmp_path / "out").model, res.model.arch) == got


def test_awq_and_smoothquant_accumulate_one_statistic_per_distinct_input(tiny, monkeypatch) -> None:
    get, root, cal = tiny
    calls: list[int] = []
    real = driver.collect_linear_stats

    def counting(modules, kinds, run, same_input=()):
        stats, out = real(modules, kinds, run, same_input)
        calls.append(len({id(s) for s in stats.values()}))
        return stats, out

    monkeypatch.setattr(driver, "collect_linear_stats", counting)
    base = get("llama")
    for step in ("{awq: {bits: 4, group_size: 32, n_grid: 2, clip: false}}", "{smoothquant: {}}"):
        calls.clear()
        lm = slimlm.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.info)
        slimlm.compress(lm, cal + f"steps: [{step}]\n")
        assert calls == [4, 4] if "awq" in step else calls == [3, 3], (step, calls)  # qkv, o, gate/up, down


def test_block_influence_runs_each_block_once(tiny, monkeypatch) -> None:
    get, _, cal = tiny
    base = get("llama")
    lm = slimlm.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.info)
    runs = {"n": 0}
    for block in blocks(lm.model, lm.arch):
        block.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))
    slimlm.compress(lm, cal + "steps: [{layer_drop: {n: 1}}]\n")
    assert runs["n"] == 2  # 2 blocks × 1 calibration batch, each run once


def _distill(args: list[str], capsys) -> str:
    rc = main(["distill", "--loss", "fkl", "--steps", "2", "--batch-size", "1", "--seq-len", "16", "--lr", "0.01", *args])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def test_distill_trains_dense_student_then_packs_it(tiny, tmp_path, capsys) -> None:
    """wanda (dense with zeros) → train → rtn: the trained weights are quantized, pruned zeros kept."""
    get, root, cal = tiny
    folder = str(root / "llama")
    text = str(root / "text.txt")
    steps = cal + "steps:\n  - wanda: {sparsity: 0.5}\n  - rtn: {bits: 8, group_size: 32}\n"
    (tmp_path / "r.yaml").write_text(steps)
    out = _distill(["--teacher", folder, "--student-recipe", str(tmp_path / "r.yaml"), "--data", text,
                    "--out", str(tmp_path / "student")], capsys)
    assert "['rtn'] run on the trained student" in out
    trained = slimlm.load(tmp_path / "student")
    untrained = slimlm.compress(folder, steps).model
    q = trained.model.get_submodule("model.layers.0.mlp.down_proj")
    assert q.format in {"quant_linear", "sparse_quant_linear"}, q
    w, w0 = q.weight, untrained.model.get_submodule("model.layers.0.mlp.down_proj").weight
    assert not torch.equal(w, w0), "the packed weights are not the trained ones"
    assert float((w == 0).float().mean()) >= 0.5  # the pruned half stayed zero through training and rounding
    manifest = json.loads((tmp_path / "student" / "slimlm.json").read_text())
    assert [s["method"] for s in manifest["report"]["steps"]] == ["wanda", "rtn"]


def test_distill_pruned_student_is_compacted_by_the_shared_finalisation(tiny, tmp_path, capsys) -> None:
    get, root, cal = tiny
    (tmp_path / "r.yaml").write_text(cal + "storage_dtype: bfloat16\nsteps: [{magnitude: {sparsity: 0.5}}]\n")
    _distill(["--teacher", str(root / "llama"), "--student-recipe", str(tmp_path / "r.yaml"), "--data",
              str(root / "text.txt"), "--out", str(tmp_path / "s")], capsys)
    lm = slimlm.load(tmp_path / "s")
    assert all(isinstance(m, SparseLinear) for b in blocks(lm.model, lm.arch) for m in block_linears(b, lm.arch).values())
    assert json.loads((tmp_path / "s" / "slimlm.json").read_text())["storage_dtype"] == "bfloat16"


def test_distill_refuses_a_packed_student_without_lora(tiny, tmp_path, capsys) -> None:
    get, root, cal = tiny
    slimlm.compress(str(root / "llama"), cal + "steps: [{rtn: {bits: 4, group_size: 32}}]\n", tmp_path / "q")
    rc = main(["distill", "--teacher", str(root / "llama"), "--student", str(tmp_path / "q"), "--steps", "1",
               "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "packed layers training cannot update" in err and "--student-recipe" in err
    assert not (tmp_path / "s").exists()


def test_bos_comes_from_the_tokenizer(tiny) -> None:
    from tokenizers.processors import TemplateProcessing

    from slimlm.models.info import adds_bos

    get, _, _ = tiny
    tok = copy.deepcopy(get("llama").tokenizer)
    assert not adds_bos(tok)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert adds_bos(tok)


def test_multimodal_gemma3_is_refused_before_loading(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}))
    with pytest.raises(SlimlmError, match="multimodal checkpoint"):
        slimlm.load(tmp_path)


def test_full_training_after_a_packing_step_is_refused_up_front(tiny) -> None:
    get, root, cal = tiny
    base = get("llama")
    lm = slimlm.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.info)
    with pytest.raises(SlimlmError, match="packs the layers"):
        slimlm.compress(lm, cal + "steps:\n  - rtn: {bits: 4, group_size: 32}\n  - distill: {steps: 1}\n")
    assert all(type(m) is nn.Linear for m in block_linears(blocks(lm.model, lm.arch)[0], lm.arch).values())
