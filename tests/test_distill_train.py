"""Real distillation runs on a layer-dropped SmolLM2-135M student: learning, resume, LoRA, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import slimlm
from slimlm.distill import DistillConfig, train
from slimlm.distill.lora import QuantLoraLinear, add_lora, load_adapters, merge_lora, save_adapters
from slimlm.methods.quant.rtn import requantize_like
from slimlm.errors import SlimlmError
from slimlm.eval import perplexity
from slimlm.layers.quant import QuantLinear
from slimlm.methods.prune.layerdrop import drop_blocks

FAST = dict(batch_size=2, seq_len=64, progress=False)


def student(keep: tuple[int, ...] = (0, 15, 29)) -> slimlm.LoadedModel:
    """The default model with all but ``keep`` blocks removed (a real, badly damaged student)."""
    lm = slimlm.load("default")
    drop_blocks(lm.model, lm.arch, set(range(30)) - set(keep))
    return lm


@pytest.mark.slow
def test_kd_lowers_kd_loss_and_heldout_perplexity(default_lm, shakespeare_eval) -> None:
    s = student()
    before = perplexity(s.model, s.tokenizer, shakespeare_eval, max_tokens=512, progress=False)["perplexity"]
    cfg = DistillConfig(loss="skl", steps=6, lr=1e-3, **FAST)
    res = train(s.model, default_lm.model, s.tokenizer, cfg, teacher_tokenizer=default_lm.tokenizer)
    losses = [loss for _, loss in res.losses]
    after = perplexity(s.model, s.tokenizer, shakespeare_eval, max_tokens=512, progress=False)["perplexity"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert after < 0.5 * before, (before, after)
    assert res.tokens == 6 * 2 * 64


@pytest.mark.slow
def test_resume_continues_at_same_step_with_same_loss(default_lm, tmp_path) -> None:
    cfg = DistillConfig(loss="fkl", steps=3, lr=1e-3, save_every=1, **FAST)
    full = train(student().model, default_lm.model, default_lm.tokenizer, cfg).losses

    def interrupt(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(student().model, default_lm.model, default_lm.tokenizer, cfg, out=tmp_path, on_step=interrupt)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-0000002"]
    resumed = train(student().model, default_lm.model, default_lm.tokenizer, cfg, out=tmp_path)
    assert resumed.start_step == 2 and [s for s, _ in resumed.losses] == [3]
    assert resumed.losses[0][1] == pytest.approx(full[2][1], rel=1e-4)

    other = cfg.model_copy(update={"lr": 5e-4})
    with pytest.raises(SlimlmError, match="another run"):
        train(student().model, default_lm.model, default_lm.tokenizer, other, out=tmp_path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(default_lm, tmp_path) -> None:
    s = student(keep=(0, 29))

    def poison(step: int, loss: float) -> None:
        with torch.no_grad():
            s.model.model.norm.weight.fill_(float("nan"))

    cfg = DistillConfig(loss="lm", steps=3, lr=1e-4, save_every=1, **FAST)
    with pytest.raises(SlimlmError, match=r"loss became nan at step 2.*step-0000001"):
        train(s.model, None, s.tokenizer, cfg, out=tmp_path, on_step=poison)
    state = json.loads((tmp_path / "step-0000001" / "state.json").read_text())
    assert state["step"] == 1 and state["loss"] == state["loss"]  # finite, kept


def test_different_tokenizers_point_to_sequence_kd(default_lm) -> None:
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(default_lm.info.weights_dir)
    other.add_tokens(["<not-in-the-student>"])
    with pytest.raises(SlimlmError, match="different tokenizers.*sequence-level KD"):
        train(default_lm.model, default_lm.model, default_lm.tokenizer, DistillConfig(**FAST), teacher_tokenizer=other)


def test_empty_data_is_an_error(default_lm, tmp_path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SlimlmError, match="not enough for one"):
        train(default_lm.model, None, default_lm.tokenizer, DistillConfig(loss="lm", **FAST), data=str(empty))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n")
    with pytest.raises(SlimlmError, match="no prompt/completion rows"):
        train(default_lm.model, None, default_lm.tokenizer, DistillConfig(loss="lm", mode="sequence", **FAST), data=str(pairs))


def test_sequence_level_kd_trains_on_completions_only(tmp_path) -> None:
    s = student(keep=(0, 29))
    rows = [{"prompt": f"Question {i}: what is the capital of France?", "completion": " Paris is the capital of France."} for i in range(8)]
    path = tmp_path / "teacher.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DistillConfig(loss="lm", mode="sequence", steps=4, lr=2e-3, **FAST)
    losses = [loss for _, loss in train(s.model, None, s.tokenizer, cfg, data=str(path)).losses]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_qlora_on_packed_4bit_trains_merges_and_saves(tmp_path, default_lm) -> None:
    rtn4 = "steps:\n  - rtn: {bits: 4, group_size: 64}\n"
    s = student(keep=(0, 29))
    slimlm.compress(s, rtn4)
    peft_model = add_lora(s.model, s.arch, r=4)
    assert any(isinstance(m, QuantLoraLinear) for m in peft_model.modules())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    res = train(peft_model, default_lm.model, s.tokenizer, DistillConfig(loss="fkl", steps=3, lr=2e-3, **FAST))
    assert res.losses[-1][1] < res.losses[0][1]
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    folder = save_adapters(peft_model, tmp_path / "adapters")
    assert (folder / "adapter_model.safetensors").stat().st_size < 2_000_000  # adapters only

    again = student(keep=(0, 29))
    slimlm.compress(again, rtn4)
    reloaded = load_adapters(again.model, folder).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, ref, atol=1e-4)

    dense = merge_lora(peft_model)  # exact fold of scaling·B·A into dequantized weights
    with torch.no_grad():
        assert torch.allclose(dense(input_ids=ids).logits, ref, atol=1e-3)
    packed = merge_lora(reloaded, requantize=requantize_like)  # re-rounded onto a 4-bit grid of the same group size
    q = packed.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.bits == 4 and q.group_size == 64
    w = dense.model.layers[0].mlp.down_proj.weight
    step = q.scales.float().repeat_interleave(64, dim=1)[:, : w.shape[1]]
    assert ((q.weight - w).abs() <= 1.01 * step).all()  # every weight within one grid step of the merged value


def test_on_policy_trains_on_student_samples_scored_by_teacher(default_lm) -> None:
    s = student(keep=(0, 29))
    cfg = DistillConfig(loss="jsd", mode="on_policy", on_policy_fraction=1.0, gen_tokens=8, replay_size=4, steps=2,
                        lr=1e-3, batch_size=2, seq_len=32, progress=False)
    res = train(s.model, default_lm.model, s.tokenizer, cfg)
    assert len(res.losses) == 2 and all(0 < loss < 100 for _, loss in res.losses)
    assert res.tokens == 2 * 2 * 32  # prompt + generated tokens per sequence


class CalledTeacher(torch.nn.Module):
    """Same parameters as the teacher (same run fingerprint) but fails if the trainer calls it."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.inner = teacher

    def forward(self, **kwargs):
        raise AssertionError("the teacher was run although its top-k cache holds the batch")


def test_topk_teacher_cache_is_written_and_reused(default_lm, tmp_path) -> None:
    cfg = DistillConfig(loss="fkl", topk=16, steps=2, lr=1e-3, batch_size=1, seq_len=32, progress=False)
    first = train(student(keep=(0, 29)).model, CalledTeacher(default_lm.model).inner, default_lm.tokenizer, cfg, out=tmp_path / "a")
    assert len(list((tmp_path / "a" / "teacher-cache").glob("batch-*.safetensors"))) == 2
    shutil.copytree(tmp_path / "a" / "teacher-cache", tmp_path / "b" / "teacher-cache")
    again = train(student(keep=(0, 29)).model, CalledTeacher(default_lm.model), default_lm.tokenizer, cfg, out=tmp_path / "b")
    assert again.losses == first.losses
