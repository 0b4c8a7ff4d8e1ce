"""Every family × every method on tiny random-initialised models: it works (runs; save → reload gives
identical logits; structured pruning also reloads with plain transformers) or it is refused before
any work with one line. ``python tests/test_families.py`` prints the table of docs/architectures.md.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import slimlm
from slimlm.data import load_text
from slimlm.errors import SlimlmError

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, VARIANTS, build, char_tokenizer  # noqa: E402

NAMES = [*FAMILIES, *VARIANTS]
METHODS = {
    "rtn": "{rtn: {bits: 4, group_size: 32}}",
    "gptq": "{gptq: {bits: 4, group_size: 32}}",
    "awq": "{awq: {bits: 4, group_size: 32, n_grid: 4, clip_grid: 4}}",
    "smoothquant": "{smoothquant: {}}",
    "nf4": "{nf4: {}}",
    "ternary": "{ternary: {}}",
    "embedding": "{embedding: {bits: 8, group_size: 32}}",
    "magnitude": "{magnitude: {sparsity: 0.5}}",
    "wanda": "{wanda: {sparsity: 0.5}}",
    "sparsegpt": "{sparsegpt: {sparsity: 0.5, blocksize: 32}}",
    "nm 2:4": "{sparsegpt: {n: 2, m: 4, blocksize: 32}}",
    "layer_drop": "{layer_drop: {n: 1}}",
    "width": "{width: {mlp_ratio: 0.5, heads_ratio: 0.5}}",
    "width (MLP)": "{width: {mlp_ratio: 0.5}}",
    "svd": "{svd: {param_ratio: 0.5}}",
    "asvd": "{asvd: {param_ratio: 0.5}}",
    "distill": "{distill: {loss: fkl, steps: 1, batch_size: 1, seq_len: 16, data: TEXT}}",
}
STRUCTURED = {"layer_drop", "width", "width (MLP)"}
# (model, method) → what the one-line refusal says; every other cell must work
REFUSED = {
    ("opt", "width"): "derives head_dim from hidden_size",
    ("opt-postnorm", "width"): "derives head_dim from hidden_size",
    ("opt-postnorm", "awq"): "post-norm",
    ("opt-postnorm", "smoothquant"): "post-norm",
    **{("gpt2", m): "Conv1D" for m in METHODS},
}
IDS = torch.randint(4, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def make_tiny(root: Path):
    """name → LoadedModel (read-only base) or the SlimlmError its load raised, built on first use under ``root``."""
    text = load_text("shakespeare", "calib")[:40_000]
    (root / "text.txt").write_text(text)
    tok = char_tokenizer(text)
    models: dict[str, slimlm.LoadedModel | SlimlmError] = {}

    def get(name: str):
        if name not in models:
            folder = build(name, root / name, tok)
            try:
                models[name] = slimlm.load(folder)
            except SlimlmError as exc:
                models[name] = exc
        return models[name]

    return get, root


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def recipe(method: str, root: Path) -> str:
    cal = f"calibration: {{source: {root / 'text.txt'}, n_samples: 4, seqlen: 32}}\n"
    return cal + f"steps: [{METHODS[method].replace('TEXT', str(root / 'text.txt'))}]\n"


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def run_cell(get, root: Path, name: str, method: str, tmp: Path) -> str:
    """``works`` or the refusal line; asserts the works-contract on the way."""
    base = get(name)
    if isinstance(base, SlimlmError):
        return str(base)
    lm = slimlm.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.info)
    out = tmp / "artifact"
    try:
        res = slimlm.compress(lm, recipe(method, root), out)
    except SlimlmError as exc:
        assert not out.exists(), "a refused step left an artifact"
        assert torch.equal(logits(lm.model), logits(base.model)), "a refused step changed the model"
        return str(exc)
    reloaded = slimlm.load(out)
    assert torch.equal(logits(res.model.model), logits(reloaded.model)), "save → reload changed the logits"
    if method in STRUCTURED:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert torch.equal(logits(plain), logits(reloaded.model)), "plain transformers rebuilt another model"
        assert res.model.info.n_params < base.info.n_params
    return "works"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", NAMES)
def test_family_method(tiny, tmp_path, name: str, method: str) -> None:
    get, root = tiny
    outcome = run_cell(get, root, name, method, tmp_path)
    expected = REFUSED.get((name, method))
    if expected is None:
        assert outcome == "works", outcome
    else:
        assert expected in outcome and "\n" not in outcome, outcome


@pytest.mark.parametrize("name", [n for n in NAMES if (n, "awq") not in REFUSED])
def test_scale_folds_keep_the_function(tiny, name: str) -> None:
    """AWQ's folds (into pre-norms with their offset, v → o, up → down) change no output before rounding."""
    get, root = tiny
    base = get(name)
    lm = slimlm.LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.info)
    cal = recipe("awq", root).split("steps:")[0]
    # float32 storage: the fp16 rounding every artifact gets would blur the comparison by ~1e-4
    slimlm.compress(lm, cal + "storage_dtype: float32\nsteps: [{awq: {quantize: false, group_size: 32, n_grid: 4}}]\n")
    ref = logits(base.model)
    moved = sum(not torch.equal(a, b) for a, b in zip(lm.model.parameters(), base.model.parameters()))
    assert moved > 0, "no scale was folded"
    assert torch.allclose(logits(lm.model), ref, atol=1e-4 * float(ref.abs().max()), rtol=0), name


if __name__ == "__main__":  # the docs table: python tests/test_families.py > table.md
    import tempfile

    get, root = make_tiny(Path(tempfile.mkdtemp(prefix="tiny")))
    print("| model | " + " | ".join(METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    reasons: dict[str, int] = {}
    for name in NAMES:
        cells = []
        for method in METHODS:
            outcome = run_cell(get, root, name, method, Path(tempfile.mkdtemp()))
            if outcome == "works":
                cells.append("✓")
            else:
                key = outcome.split(" — ")[0]
                cells.append(f"✗ ({reasons.setdefault(key, len(reasons) + 1)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for text, i in reasons.items():
        print(f"{i}. {text}")


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "gpt2"])
def test_rows_name_real_modules(tiny, name: str) -> None:
    """Every path of the architecture row exists in the model transformers builds for that family."""
    from slimlm.models.arch import blocks, intermediate_size

    lm = tiny[0](name)
    arch = lm.arch
    for path in (arch.embed, arch.final_norm, arch.lm_head):
        lm.model.get_submodule(path)
    block = blocks(lm.model, arch)[0]
    for path in (*arch.qkv_paths(), arch.attn_path(arch.o), *arch.gate_up_paths(), arch.mlp_path(arch.down),
                 arch.attn_norm, arch.mlp_norm, *arch.output_norms):
        block.get_submodule(path)
    assert intermediate_size(block, arch) == getattr(lm.model.config, arch.inter_key)
