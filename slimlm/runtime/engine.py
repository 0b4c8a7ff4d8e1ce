"""The one generation engine: a static KV cache written in place and a decode loop over the model's weights.

Why not ``model.generate``: each HF step re-builds masks, cache positions and logits processors
(~4 ms of a ~14 ms SmolLM2 token here). The engine reads the architecture's facts from
:mod:`slimlm.models.arch` once, packs every linear into its fast kernel once
(:mod:`slimlm.runtime.kernels`), precomputes the rotary tables with the model's own rotary module,
and then runs ~15 tensor ops per block per step.

Cache: per block, keys/values ``(B, H_kv, max_seq, D)`` in the compute dtype; row b's token at
position p lives in slot p, so rows of a batch advance independently (per-row positions, per-row
masks, no left padding). Sliding-window layers (Gemma-3) mask keys older than the window.
Each block keeps its own per-row length: a call with ``n_blocks=n`` writes blocks 0…n−1 starting at
block n−1's length, so a self-speculation draft (shallow blocks run ahead) is simply overwritten by
the verifying full forward, which starts at the last block's length.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.arch import Arch, blocks, get_module
from slimlm.runtime.kernels import Kernel, build_kernel, describe, int4_ok, int8_ok, kernel_paths
from slimlm.runtime.decode import GenResult, iter_generation, run_generation
from slimlm.runtime.sampling import GenConfig

DEFAULT_MAX_SEQ = 2048


class _Norm:
    """RMSNorm as one fused op (normalised in fp32 for bf16 inputs); ``offset`` = 1 for Gemma's ``x·(1 + w)``."""

    def __init__(self, mods: list[nn.Module], offset: float, dtype: torch.dtype) -> None:
        w = [m.weight.detach().float() + offset for m in mods]
        self.stacked = len(mods) > 1  # per-head norms of q and k applied to the joint (…, H_q + H_kv, D) view
        self.weight = (torch.stack(w) if self.stacked else w[0]).to(dtype)
        self.eps = float(getattr(mods[0], "variance_epsilon", getattr(mods[0], "eps", 1e-6)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.stacked:
            return F.rms_norm(x, x.shape[-1:], None, self.eps) * self.weight
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


@dataclass
class _Block:
    qkv: Kernel
    o: Kernel
    gate_up: Kernel  # gate and up fused (or up alone for non-gated MLPs)
    down: Kernel
    attn_norm: _Norm
    mlp_norm: _Norm
    qk_norm: _Norm | None  # q_norm and k_norm stacked per head (weights (H_q + H_kv, D))
    attn_out_norm: _Norm | None
    mlp_out_norm: _Norm | None
    act: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    scaling: float
    layer_type: str  # key into the rotary tables and masks
    window: int | None
    softcap: float | None


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [x2, x1] along the last dim; with a sign-folded sin table this is HF's ``rotate_half``."""
    shape = x.shape
    return x.unflatten(-1, (2, shape[-1] // 2)).flip(-2).reshape(shape)


# The engine lives on its model (a plain attribute, not a submodule): a dict keyed by the model would keep
# every model alive for good, since the engine refers back to it — model and engine are freed together.
_ENGINE_ATTR = "_slimlm_engine"


def engine_for(lm: Any, *, max_seq: int | None = None, **kwargs: Any) -> "Engine":
    """A cached engine for ``lm`` (kernels packed once per model and dtype/device/compile options).

    A different ``max_seq`` only re-sizes the cache and rotary tables; batches grow it on ``reset``.
    """
    eng = lm.model.__dict__.get(_ENGINE_ATTR)
    if eng is None or eng.options != kwargs:
        eng = Engine(lm, max_seq=max_seq, **kwargs)
        lm.model.__dict__[_ENGINE_ATTR] = eng
    elif max_seq is not None:
        eng.set_max_seq(max_seq)
    return eng


class Engine:
    """Static-cache prefill/decode over a loaded model; see the module docstring for the cache layout."""

    def __init__(self, lm: Any, *, max_batch: int = 1, max_seq: int | None = None, dtype: torch.dtype | None = None,
                 compile: bool = False, device: str | None = None, notice: bool = True) -> None:
        self.options = {"dtype": dtype, "compile": compile, "device": device}
        self.lm, self.tokenizer = lm, lm.tokenizer
        model, arch, cfg = lm.model, lm.arch, lm.model.config
        if arch.rotary is None:
            raise SlimlmError(f"the engine does not run {lm.info.model_type} (no rotary position table)",
                              "evaluate it with perplexity only, or add its position scheme to slimlm/runtime/engine.py")
        self.device = torch.device(device) if device else next(model.parameters()).device
        if device:
            model.to(self.device)
        layers = list(blocks(model, arch))
        self.dtype = dtype or self._auto_dtype(model)
        # CPU attention is 3-5x faster in fp32 than in bf16 (torch 2.13 SDPA, 1-token queries): keep K/V in fp32 there
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.n_layers, self.max_batch = len(layers), max_batch
        limit = int(getattr(cfg, "max_position_embeddings", DEFAULT_MAX_SEQ) or DEFAULT_MAX_SEQ)
        self.context_limit = limit
        self.max_seq = min(max_seq or DEFAULT_MAX_SEQ, limit)
        self.vocab_size = int(cfg.vocab_size)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        with torch.no_grad():
            self.blocks = [self._plan(b, i, arch, cfg) for i, b in enumerate(layers)]
            self.embed = get_module(model, arch.embed)
            self.final_norm = _Norm([get_module(model, arch.final_norm)], arch.norm_offset, self.dtype)
            head = get_module(model, arch.lm_head)
            self.head = build_kernel([getattr(head, "_table", None) or head], self.dtype, self.device)
            self.rope = self._rope_tables()
        attn = self.blocks[0]
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attn.qkv.out_features // (self.n_heads + 2 * self.n_kv)
        self.paths = kernel_paths([k for b in self.blocks for k in (b.qkv, b.o, b.gate_up, b.down)] + [self.head])
        self.compiled = False
        self._block_fn = self._block
        if compile:
            self._block_fn = torch.compile(self._block, dynamic=True)  # type: ignore[assignment]
            self.compiled = True
        if notice and set(self.paths) - {"dense", "int4pack", "int8pack"}:
            print(f"slimlm engine: no fast kernel for some layers; kernel paths {describe(self.paths)} "
                  f"(dequantized = weight decoded once into {str(self.dtype).removeprefix('torch.')})", file=sys.stderr)
        self.reset(1)

    # ---- building -------------------------------------------------------------------------------
    def _auto_dtype(self, model: nn.Module) -> torch.dtype:
        """bf16 where the CPU int kernels are used (they are vectorized for bf16 only), else the model's dtype."""
        packed = any(int4_ok(m, self.device) or int8_ok(m, self.device) for m in model.modules())
        float_params = [p.dtype for p in model.parameters() if p.is_floating_point()]
        return torch.bfloat16 if packed else (float_params[0] if float_params else torch.float32)

    def _plan(self, block: nn.Module, index: int, arch: Arch, cfg: Any) -> _Block:
        attn, mlp = get_module(block, arch.attn), get_module(block, arch.mlp)
        lin = lambda path: block.get_submodule(path)  # noqa: E731
        dt, dev, off = self.dtype, self.device, arch.norm_offset
        opt = lambda root, path: _Norm([get_module(root, path)], off, dt) if path else None  # noqa: E731
        types = getattr(cfg, "layer_types", None)
        slides = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
        layer_type = types[index] if types else ("sliding_attention" if slides else "full_attention")
        window = cfg.sliding_window if layer_type == "sliding_attention" else None
        ups = [lin(arch.mlp_path(n) if arch.mlp else n) for n in ([arch.gate, arch.up] if arch.gate else [arch.up])]
        return _Block(
            qkv=build_kernel([lin(arch.attn_path(n)) for n in (arch.q, arch.k, arch.v)], dt, dev),
            o=build_kernel([lin(arch.attn_path(arch.o))], dt, dev),
            gate_up=build_kernel(ups, dt, dev),
            down=build_kernel([lin(arch.mlp_path(arch.down) if arch.mlp else arch.down)], dt, dev),
            attn_norm=_Norm([get_module(block, arch.attn_norm)], off, dt),
            mlp_norm=_Norm([get_module(block, arch.mlp_norm)], off, dt),
            qk_norm=_Norm([get_module(attn, arch.q_norm)] * cfg.num_attention_heads
                          + [get_module(attn, arch.k_norm)] * cfg.num_key_value_heads, off, dt) if arch.q_norm else None,
            attn_out_norm=opt(block, arch.attn_out_norm), mlp_out_norm=opt(block, arch.mlp_out_norm),
            act=mlp.act_fn, gated=arch.gate is not None, scaling=float(attn.scaling),
            layer_type=layer_type, window=window, softcap=getattr(cfg, "attn_logit_softcapping", None),
        )

    def _rope_tables(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin (max_seq, D) per layer type, from the model's own rotary module (any rope scaling)."""
        rotary = get_module(self.lm.model, self.lm.arch.rotary)
        takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
        pos = torch.arange(self.max_seq, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=torch.float32)
        tables = {}
        for lt in {b.layer_type for b in self.blocks}:
            cos, sin = rotary(probe, pos, lt) if takes_type else rotary(probe, pos)
            half = sin.shape[-1] // 2
            sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # folds rotate_half's sign
            tables[lt] = (cos[0].to(self.dtype), sin[0].to(self.dtype))
        return tables

    # ---- cache ----------------------------------------------------------------------------------
    def set_max_seq(self, max_seq: int) -> None:
        """Hold ``max_seq`` tokens per row from now on (the cache is emptied)."""
        max_seq = min(max_seq, self.context_limit)
        if max_seq != self.max_seq:
            self.max_seq = max_seq
            with torch.no_grad():
                self.rope = self._rope_tables()
            self._k = None  # type: ignore[assignment]
            self.reset(self.batch)

    def reset(self, batch: int = 1) -> None:
        """An empty cache for ``batch`` rows (reallocated only when the batch grows)."""
        if batch > self.max_batch:
            self.max_batch = batch
        shape = (self.max_batch, self.n_kv, self.max_seq, self.head_dim)
        if getattr(self, "_k", None) is None or self._k[0].shape != shape:
            self._k = None  # type: ignore[assignment]  # free the old cache before allocating the new one
            self._k = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.blocks]
            self._v = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.blocks]
        self.batch = batch
        self._len = torch.zeros(self.n_layers, batch, dtype=torch.long)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) tokens cached per row by the full model (the last block)."""
        return self._len[-1].clone()

    def truncate(self, length: int | torch.Tensor) -> None:
        """Roll rows back to at most ``length`` tokens (an int for all rows, or (B,)) in every block."""
        limit = torch.as_tensor(length, dtype=torch.long).expand(self.batch)
        self._len = torch.minimum(self._len, limit[None])

    # ---- forward --------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ids: torch.Tensor, *, n_blocks: int | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits (B, T, V) and the T tokens appended to each row's cache at its current length.

        ``n_blocks``: only the first n blocks (+ final norm + head). ``at`` (B,): return only the
        logits at these offsets within T, as (B, 1, V) — prefill needs one position, not T.
        """
        bsz, t = ids.shape
        if bsz != self.batch:
            raise ValueError(f"ids has {bsz} rows but the cache holds {self.batch}; call reset({bsz}) first")
        n = n_blocks or self.n_layers
        start = self._len[n - 1]  # (B,)
        end = int(start.max()) + t
        if end > self.max_seq:
            raise SlimlmError(f"{end} tokens do not fit the engine's context of {self.max_seq}",
                              f"shorten the prompt or build the engine with a larger max_seq (the model allows {self.context_limit})")
        pos = (start[:, None] + torch.arange(t)).to(self.device)  # (B, T)
        uniform = bool((start == start[0]).all())
        s0 = int(start[0])
        rope = {lt: (c[pos][:, :, None], s[pos][:, :, None]) for lt, (c, s) in self.rope.items()}  # (B, T, 1, D)
        masks = self._masks(pos, end)
        h = self.embed(ids.to(self.device)).to(self.dtype)
        for i in range(n):
            h = self._block_fn(i, h, rope[self.blocks[i].layer_type], masks[self.blocks[i].window], pos,
                               s0 if uniform else None, end)
        self._len[:n] = start + t
        if at is not None:
            h = h[torch.arange(bsz, device=h.device), at.to(h.device)][:, None]
        logits = self.head(self.final_norm(h)).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _masks(self, pos: torch.Tensor, end: int) -> dict[int | None, torch.Tensor | None]:
        """Boolean (B, 1, T, S) masks per window size; None where every cached key is visible."""
        slots = torch.arange(end, device=pos.device)
        out: dict[int | None, torch.Tensor | None] = {}
        for window in {b.window for b in self.blocks}:
            if pos.shape[1] == 1 and bool((pos[:, 0] == end - 1).all()) and (window is None or end <= window):
                out[window] = None
                continue
            ok = slots[None, None] <= pos[..., None]  # (B, T, S)
            if window is not None:
                ok &= slots[None, None] > pos[..., None] - window
            out[window] = ok[:, None]
        return out

    def _block(self, i: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
               pos: torch.Tensor, s0: int | None, end: int) -> torch.Tensor:
        blk = self.blocks[i]
        bsz, t, _ = h.shape
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv = blk.qkv(blk.attn_norm(h))
        qk = qkv[..., : (nh + nkv) * d].view(bsz, t, nh + nkv, d)  # q and k heads side by side: one rope
        v = qkv[..., (nh + nkv) * d :].view(bsz, t, nkv, d)
        if blk.qk_norm is not None:
            qk = blk.qk_norm(qk)
        cos, sin = rope
        qk = qk * cos + _swap_halves(qk) * sin
        q, k = qk[:, :, :nh], qk[:, :, nh:]
        kc, vc = self._k[i], self._v[i]
        if s0 is not None:  # every row writes at the same slot: a plain slice copy
            kc[:bsz, :, s0:s0 + t] = k.transpose(1, 2)
            vc[:bsz, :, s0:s0 + t] = v.transpose(1, 2)
        else:
            rows = torch.arange(bsz, device=h.device)[:, None]
            kc[rows, :, pos] = k
            vc[rows, :, pos] = v
        keys, values = kc[:bsz, :, :end], vc[:bsz, :, :end]
        q = q.transpose(1, 2).to(keys.dtype)  # (B, H, T, D)
        if blk.softcap is None:
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=blk.scaling, enable_gqa=nkv != nh)
        else:  # Gemma-2's tanh soft-capped attention scores: no fused kernel takes them
            keys, values = keys.repeat_interleave(nh // nkv, 1), values.repeat_interleave(nh // nkv, 1)
            scores = torch.tanh((q @ keys.transpose(-1, -2)) * blk.scaling / blk.softcap) * blk.softcap
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            a = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values
        return self._finish(blk, h, a.transpose(1, 2).reshape(bsz, t, nh * d).to(h.dtype))

    @staticmethod
    def _finish(blk: _Block, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP, residual: (B, T, H·D) attention output → next hidden state."""
        a = blk.o(a)
        if blk.attn_out_norm is not None:
            a = blk.attn_out_norm(a)
        h = h + a
        gu = blk.gate_up(blk.mlp_norm(h))
        if blk.gated:
            g, u = gu.chunk(2, dim=-1)
            gu = blk.act(g) * u
        else:
            gu = blk.act(gu)
        m = blk.down(gu)
        if blk.mlp_out_norm is not None:
            m = blk.mlp_out_norm(m)
        return h + m

    # ---- text -----------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], *, chat: bool = False) -> list[int]:
        """Token ids: BOS where the model wants one, or the tokenizer's chat template for one user turn."""
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return ([bos] if self.lm.info.add_bos and bos is not None else []) + list(ids)

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """A whole conversation through the chat template, ready for the assistant's next turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise SlimlmError(f"the tokenizer of {self.lm.info.source} has no chat template", "drop --chat and pass a plain prompt")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])

    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.tokenizer, "eos_token_id", None),
                    getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None)):
            ids.update([src] if isinstance(src, int) else list(src or []))
        return ids

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]], cfg: GenConfig | None = None,
                 on_token: Callable[[int, str], None] | None = None, *, chat: bool = False) -> "GenResult | list[GenResult]":
        """Generate for one prompt (→ GenResult) or a batch (→ list, rows decoded together)."""

        single = isinstance(prompts, str) or (isinstance(prompts, list) and (not prompts or isinstance(prompts[0], int)))
        batch = [prompts] if single else list(prompts)  # type: ignore[list-item]
        results = run_generation(self, [self.encode(p, chat=chat) for p in batch], cfg or GenConfig(), on_token)
        return results[0] if single else results

    def stream(self, prompt: str | list[int], cfg: GenConfig | None = None, *, chat: bool = False) -> Iterator[str]:
        """Text deltas as they are decoded; ``"".join(stream(...)) == generate(...).text``."""

        for _row, _token, delta in iter_generation(self, [self.encode(prompt, chat=chat)], cfg or GenConfig()):
            if delta:
                yield delta
