"""One training entry point for knowledge distillation and plain fine-tuning.

Modes (``DistillConfig.mode``):

- ``off_policy``: teacher log-probabilities on dataset text (optionally from a top-k disk cache).
- ``on_policy``: a share of the batches are continuations *sampled from the student* and scored by
  the teacher, kept in a small replay buffer and reused (GKD, Agarwal et al. 2024; DistiLLM, Ko et
  al. 2024); the rest are dataset text.
- ``sequence``: sequence-level / black-box KD (Kim & Rush 2016): LM loss on teacher *completions*
  read from a JSONL file — no teacher logits, so the tokenizers may differ.

The same function runs single-process or under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU): each
rank draws its own slice of every step's batches and gradients are averaged. Checkpoints hold the
trainable tensors, the optimizer state and a fingerprint of the run, so a resumed run continues at
the same step with the same loss and a checkpoint of another run is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from slimlm.config import StrictConfig
from slimlm.distill.data import TopKCache, dense_from_topk, pair_batch, read_pairs, tensor_digest, text_windows, topk_log_probs
from slimlm.distill.losses import LOSS_NAMES, check_loss, divergence, hidden_mse, lm_loss, teacher_log_probs, uniform_layer_map
from slimlm.errors import SlimlmError
from slimlm.layers.sparse import pruned_zeros, restore_zeros
from slimlm.runtime.continuation import continue_ids
from slimlm.runtime.sampling import GenConfig


class DistillConfig(StrictConfig):
    """Every knob of a distillation / fine-tuning run; the CLI, recipes and Python share it."""

    loss: str = Field("fkl", description=f"one of {', '.join(LOSS_NAMES)} (lm = plain fine-tuning)")
    temperature: float = 1.0
    alpha: float = Field(0.1, description="skew of skl/srkl")
    beta: float = Field(0.5, description="mixture weight of jsd")
    lm_weight: float = Field(0.0, ge=0, description="weight of the plain LM loss added to the KD loss")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the layer-mapped hidden-state MSE")
    mode: Literal["off_policy", "on_policy", "sequence"] = "off_policy"
    on_policy_fraction: float = Field(0.5, ge=0, le=1, description="share of batches sampled from the student")
    gen_tokens: int = Field(32, ge=1, description="tokens the student generates per on-policy sample")
    replay_size: int = Field(16, ge=1, description="on-policy samples kept for reuse")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(256, ge=8)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 0.0
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 = no clipping")
    grad_checkpointing: bool = False
    bf16: bool | None = Field(None, description="bf16 autocast; None = on for CUDA with bf16, off on CPU")
    train_embeddings: bool = Field(False, description="also train the (tied) embedding / LM head")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0 = only at the end)")
    seed: int = 0
    topk: int = Field(0, ge=0, description="off-policy: cache the teacher's top-k log-probs on disk (0 = live teacher)")
    lora_r: int = Field(0, ge=0, description="train LoRA adapters of this rank instead of all weights")
    lora_alpha: float = 16.0
    progress: bool = True


@dataclass
class TrainResult:
    model: nn.Module  # the student (a peft model when lora_r > 0)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of the steps run in this call
    start_step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None


def lr_factor(step: int, cfg: DistillConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine, WSD (Hu et al. 2024) or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    decay_start = cfg.steps - max(1, round(cfg.decay_fraction * cfg.steps))
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * (step - decay_start + 1) / (cfg.steps - decay_start)


def needs_teacher(cfg: DistillConfig) -> bool:
    """Teacher logits are used by every KD loss, the hidden-state term and on-policy scoring; not by sequence KD."""
    return cfg.mode != "sequence" and (cfg.loss != "lm" or cfg.hidden_weight > 0 or cfg.mode == "on_policy")


def same_tokenizer(a: Any, b: Any) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab())


def check_pair(tokenizer: Any, teacher_tokenizer: Any | None, cfg: DistillConfig) -> None:
    """Logit distillation needs one vocabulary; say so, and name the alternative."""
    if cfg.mode != "sequence" and teacher_tokenizer is not None and not same_tokenizer(tokenizer, teacher_tokenizer):
        raise SlimlmError(
            f"teacher and student use different tokenizers ({len(teacher_tokenizer)} vs {len(tokenizer)} tokens), so their logits cannot be compared",
            "use sequence-level KD (mode: sequence / --mode sequence) on teacher completions, which needs only text",
        )


def _dist() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _set_trainable(student: nn.Module, cfg: DistillConfig, arch) -> nn.Module:
    if hasattr(student, "peft_config"):  # already wrapped by peft: its adapters are what trains
        return student
    if cfg.lora_r:
        from slimlm.distill.lora import add_lora

        return add_lora(student, arch, cfg.lora_r, cfg.lora_alpha)
    tied = {id(student.get_input_embeddings().weight), id(student.get_output_embeddings().weight)}
    for p in student.parameters():
        p.requires_grad_(cfg.train_embeddings or id(p) not in tied)
    return student


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(cfg: DistillConfig, data: str, params: dict[str, nn.Parameter], teacher: nn.Module | None, windows_digest: str) -> str:
    """Identity of a run: options that change the trajectory, data, starting weights, teacher size."""
    opts = cfg.model_dump(exclude={"progress", "save_every"})
    start = hashlib.sha256()
    for name, p in params.items():
        start.update(name.encode())
        start.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    n_teacher = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    blob = json.dumps({"opts": opts, "data": data, "start": start.hexdigest(), "teacher": n_teacher, "windows": windows_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(folder.glob("step-*/state.json"))
    return done[-1].parent if done else None


def save_checkpoint(folder: Path, step: int, loss: float, run: str, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> Path:
    """Write ``folder/step-NNNNNNN`` atomically, then delete older ones (the last good one is kept)."""
    final = folder / f"step-{step:07d}"
    tmp = folder / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "loss": loss, "run": run}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, run: str, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> int:
    """Restore trainable tensors and optimizer state; returns the step to continue from."""
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("run") != run:
        raise SlimlmError(f"checkpoint {ckpt} comes from another run (different model, data or options)",
                          "pass the same options as that run, or choose a new output folder")
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=next(iter(params.values())).device, weights_only=True))
    return int(state["step"])


class Batches:
    """Deterministic micro-batches: batch ``b`` depends only on (seed, b), so resume and DDP ranks agree."""

    def __init__(self, tokenizer: Any, data: str, cfg: DistillConfig, world: int, bos_id: int | None) -> None:
        self.cfg, self.world, self.tokenizer, self.bos_id = cfg, world, tokenizer, bos_id
        n = cfg.steps * cfg.grad_accum * world * cfg.batch_size
        if cfg.mode == "sequence":
            self.pairs = read_pairs(data)
            self.windows = None
            self.digest = hashlib.sha256(json.dumps(self.pairs).encode()).hexdigest()[:16]
        else:
            self.windows = text_windows(tokenizer, data, cfg.seq_len, n, cfg.seed, bos_id)  # (n, L)
            self.digest = tensor_digest(self.windows)

    def index(self, step: int, micro: int, rank: int) -> int:
        return (step * self.cfg.grad_accum + micro) * self.world + rank

    def get(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids (B, L), mask (B, L) of positions whose logits are trained, or None for all)."""
        size = self.cfg.batch_size
        if self.windows is not None:
            return self.windows[b * size : (b + 1) * size], None
        rng = random.Random(self.cfg.seed * 1_000_003 + b)
        rows = [self.pairs[rng.randrange(len(self.pairs))] for _ in range(size)]
        ids, mask = pair_batch(self.tokenizer, rows, self.cfg.seq_len, self.bos_id)
        return ids, torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)  # logits at t predict t+1


class OnPolicy:
    """Student-sampled continuations with a replay buffer: half of the on-policy batches reuse it."""

    def __init__(self, cfg: DistillConfig) -> None:
        self.cfg = cfg
        self.buffer: list[torch.Tensor] = []

    @torch.no_grad()
    def batch(self, student: nn.Module, ids: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        rng = random.Random(cfg.seed * 7_919 + b)
        prompt_len = max(1, ids.shape[1] - cfg.gen_tokens)
        if len(self.buffer) < len(ids) or rng.random() < 0.5:
            was_training = student.training
            student.eval()
            gen = torch.Generator().manual_seed(cfg.seed * 31 + b)
            out = continue_ids(student, ids[:, :prompt_len], cfg.gen_tokens, GenConfig(max_new_tokens=cfg.gen_tokens,
                                                                                        temperature=1.0), gen)
            student.train(was_training)
            self.buffer = (self.buffer + list(out.cpu()))[-cfg.replay_size :]
            seqs = out
        else:
            seqs = torch.stack(rng.sample(self.buffer, len(ids))).to(ids.device)
        mask = torch.zeros(seqs.shape, dtype=torch.bool, device=seqs.device)
        mask[:, prompt_len - 1 : -1] = True  # logits that predict the generated tokens
        return seqs, mask


def step_loss(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, mask: torch.Tensor | None, cfg: DistillConfig,
              teacher_logp: torch.Tensor | None, layer_map: list[tuple[int, int]] | None) -> torch.Tensor:
    """The mixed objective of one micro-batch: KD divergence (or LM) + lm_weight·LM + hidden_weight·MSE."""
    want_hidden = cfg.hidden_weight > 0
    out = student(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
    logits = out.logits  # (B, L, V)
    lm_mask = None if mask is None else torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)  # targets' mask
    if cfg.loss == "lm":
        loss = lm_loss(logits, ids, lm_mask)
    else:
        loss = divergence(cfg.loss, logits, teacher_logp, mask, temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta)
        if cfg.lm_weight:
            loss = loss + cfg.lm_weight * lm_loss(logits, ids, lm_mask)
    if want_hidden:
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        loss = loss + cfg.hidden_weight * hidden_mse(out.hidden_states, t_hidden, layer_map, mask)
    return loss


def train(student: nn.Module, teacher: nn.Module | None, tokenizer: Any, cfg: DistillConfig, *, data: str = "shakespeare",
          out: str | Path | None = None, arch=None, bos_id: int | None = None, teacher_tokenizer: Any | None = None,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Distil ``teacher`` into ``student`` (or fine-tune it when ``loss='lm'``) for ``cfg.steps`` steps.

    ``data``: a text source (``shakespeare``, ``wikitext2``, a .txt path) — its calibration split —
    or, in ``sequence`` mode, a JSONL of prompt/completion pairs. ``out``: folder for checkpoints
    (``out/step-N``) and the teacher cache; an existing checkpoint there is resumed. ``on_step`` is
    called after each optimizer step with (step number, loss).
    """
    from slimlm.models.arch import arch_for

    check_loss(cfg.loss, cfg.alpha, cfg.beta, cfg.temperature)
    if needs_teacher(cfg) and teacher is None:
        raise SlimlmError(f"loss {cfg.loss!r} in mode {cfg.mode!r} needs a teacher model", "pass --teacher, or use loss lm / mode sequence")
    if cfg.mode == "sequence" and cfg.loss != "lm":
        raise SlimlmError("sequence-level KD trains on teacher text, so only loss 'lm' applies", "set loss: lm with mode: sequence")
    check_pair(tokenizer, teacher_tokenizer, cfg)
    rank, world = _dist()
    arch = arch or arch_for(student.config.model_type)
    device = next(student.parameters()).device
    batches = Batches(tokenizer, data, cfg, world, bos_id)
    if teacher is not None:
        teacher.eval()  # every teacher forward runs under no_grad; its parameters are left untouched
    student = _set_trainable(student, cfg, arch)
    base = student.get_base_model() if hasattr(student, "get_base_model") else student  # under peft's wrapper
    zeros = {w: m for w, m in pruned_zeros(base).items() if w.requires_grad}  # pruned weights stay pruned
    if cfg.grad_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    params = _trainable(student)
    run = fingerprint(cfg, data, params, teacher, batches.digest)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_dir = Path(out) if out is not None else None
    start = 0
    if ckpt_dir is not None and (last := _latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(last, run, params, opt)
    wrapped = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    cache = TopKCache(ckpt_dir / "teacher-cache", {"run": run, "k": cfg.topk}) if cfg.topk and ckpt_dir is not None and cfg.mode == "off_policy" else None
    if cfg.topk and cache is None:
        raise SlimlmError("the top-k teacher cache needs an output folder and off_policy mode", "pass --out DIR, or set topk: 0")
    on_policy = OnPolicy(cfg) if cfg.mode == "on_policy" else None
    n_student = len(base.get_submodule(arch.blocks))
    layer_map = uniform_layer_map(n_student, len(teacher.get_submodule(arch.blocks))) if cfg.hidden_weight and teacher is not None else None
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    vocab = base.get_output_embeddings().out_features

    result = TrainResult(student, start_step=start, checkpoint=_latest_checkpoint(ckpt_dir) if ckpt_dir else None)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"distill {cfg.loss}", unit="step", disable=not cfg.progress or rank != 0)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        total = 0.0
        for micro in range(cfg.grad_accum):
            b = batches.index(step, micro, rank)
            ids, mask = batches.get(b)
            ids = ids.to(device)
            mask = None if mask is None else mask.to(device)
            if on_policy is not None and random.Random(cfg.seed * 104_729 + b).random() < cfg.on_policy_fraction:
                ids, mask = on_policy.batch(student if world == 1 else wrapped.module, ids, b)
            with autocast:
                t_logp = None
                if cfg.loss != "lm":
                    cached = cache.get(b) if cache is not None else None
                    if cached is None:
                        with torch.no_grad():
                            t_logp = teacher_log_probs(teacher(input_ids=ids, use_cache=False).logits, cfg.temperature)
                        if cache is not None:
                            cached = topk_log_probs(t_logp, cfg.topk)
                            cache.put(b, *cached)
                    if cached is not None:  # the cached form is used even when just computed: runs stay identical
                        t_logp = dense_from_topk(cached[0].to(device), cached[1].to(device), vocab)
                sync = nullcontext() if world == 1 or micro == cfg.grad_accum - 1 else wrapped.no_sync()
                with sync:
                    loss = step_loss(wrapped, teacher, ids, mask, cfg, t_logp, layer_map)
                    if not torch.isfinite(loss):
                        bar.close()
                        kept = _latest_checkpoint(ckpt_dir) if ckpt_dir else None
                        raise SlimlmError(
                            f"loss became {float(loss.detach())} at step {step + 1}; training stopped" + (f", last good checkpoint kept at {kept}" if kept else ""),
                            "lower the learning rate, enable grad_clip, or check the data and the student",
                        )
                    (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
            result.tokens += ids.numel() * world
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        restore_zeros(zeros)
        result.losses.append((step + 1, total))
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{result.tokens / (time.perf_counter() - t0):.0f}")
        last = step + 1 == cfg.steps
        if ckpt_dir is not None and rank == 0 and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or last):
            result.checkpoint = save_checkpoint(ckpt_dir, step + 1, total, run, params, opt)
        if on_step is not None:
            on_step(step + 1, total)
    bar.close()
    result.seconds = time.perf_counter() - t0
    student.eval()
    return result
