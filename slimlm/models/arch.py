"""Architecture knowledge as data: where blocks, attention, MLP, norms and embeddings live, and what
the numerics around them look like (norm placement and offset, fused projections, softcapping,
embedding scale, head sizes, per-block config lists).

Adding a family is adding a row here; no algorithm branches on the model family. Methods state
the facts they rely on (:data:`NEEDS`) and :func:`unmet` says, in one line, why a family or a
particular checkpoint cannot provide one — before any work is done. See docs/architectures.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from torch import nn

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class Arch:
    """One decoder family. Module paths are relative to the model, or (``attn`` … ``mlp_norm``) to one block.

    Fused projections share one path: phi3's ``q = k = v = "qkv_proj"`` (rows ``[q | k | v]``) and
    ``gate = up = "gate_up_proj"`` (rows ``[gate | up]``).
    """

    blocks: str  # ModuleList of decoder blocks (the decoder path)
    embed: str
    final_norm: str
    lm_head: str
    attn: str  # attention submodule of a block
    q: str
    k: str
    v: str
    o: str
    mlp: str  # MLP submodule of a block ("" = the linears sit on the block itself, as in OPT)
    up: str
    down: str
    gate: str | None  # None for non-gated MLPs (OPT's fc1 → relu → fc2)
    attn_norm: str  # the norm before attention: it feeds q/k/v in pre-norm placement
    mlp_norm: str  # the norm before the MLP: it feeds gate/up in pre-norm placement
    # Gemma's sandwich norms normalize each sub-layer's *output* before the residual add; they feed no
    # linear, so nothing is folded into them, but layer-wise code must not mistake them for pre-norms.
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    q_norm: str | None = None  # per-head RMSNorm of queries/keys inside the attention (Gemma-3, Qwen3)
    k_norm: str | None = None
    rotary: str | None = "model.rotary_emb"  # the model's rotary-embedding module (None: no RoPE, e.g. OPT)
    norm_offset: float = 0.0  # Gemma's RMSNorm computes x̂ · (1 + w): folding a scale must respect the offset
    # Config flag that switches pre-norm on (OPT's do_layer_norm_before). False = post-norm: the norms
    # sit after each residual add, and no scale can be folded into them without changing the model.
    prenorm_flag: str | None = None
    embed_scaled: bool = False  # the embedding module multiplies by √hidden_size (Gemma)
    attn_softcap: str | None = None  # config key: tanh cap on attention logits (Gemma-2)
    final_softcap: str | None = None  # config key: tanh cap on the output logits (Gemma-2/3)
    n_heads_key: str = "num_attention_heads"
    n_kv_key: str | None = "num_key_value_heads"  # None: every query head has its own K/V head
    # Config key that sets the head size; None = derived as hidden_size // heads, so removing heads
    # would change it and a plain-transformers reload could not rebuild the pruned model.
    head_dim_key: str | None = "head_dim"
    inter_key: str = "intermediate_size"  # MLP width in the config (OPT: ffn_dim)
    heads_from_config: bool = False  # attention reads head counts from the shared config at run time (phi3)
    # Per-block list of attention kinds (sliding-window / full; Gemma, Qwen, Mistral): it must follow
    # the blocks when some are removed, or the kept blocks get another block's window.
    layer_types_key: str | None = "layer_types"
    refused: str | None = None  # the whole family is refused with this reason

    @property
    def output_norms(self) -> tuple[str, ...]:
        return tuple(n for n in (self.attn_out_norm, self.mlp_out_norm) if n)

    @property
    def fused_qkv(self) -> bool:
        return self.q == self.k == self.v

    @property
    def fused_gate_up(self) -> bool:
        return self.gate is not None and self.gate == self.up

    def attn_path(self, leaf: str) -> str:
        return f"{self.attn}.{leaf}"

    def mlp_path(self, leaf: str) -> str:
        return f"{self.mlp}.{leaf}" if self.mlp else leaf

    def qkv_paths(self) -> tuple[str, ...]:
        """Distinct block paths of the linears reading the attention input (one when fused)."""
        return tuple(dict.fromkeys(self.attn_path(n) for n in (self.q, self.k, self.v)))

    def gate_up_paths(self) -> tuple[str, ...]:
        """Distinct block paths of the linears reading the MLP input (one when fused or ungated)."""
        return tuple(dict.fromkeys(self.mlp_path(n) for n in (self.gate, self.up) if n))


LLAMA = Arch(
    blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj",
    mlp="mlp", up="up_proj", down="down_proj", gate="gate_proj",
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
)
GEMMA = replace(
    LLAMA, mlp_norm="pre_feedforward_layernorm", attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    norm_offset=1.0, embed_scaled=True, attn_softcap="attn_logit_softcapping", final_softcap="final_logit_softcapping",
)

ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": replace(LLAMA, q_norm="q_norm", k_norm="k_norm"),  # per-head norms after q/k: they read no folded scale
    "gemma2": GEMMA,
    "gemma3_text": replace(GEMMA, q_norm="q_norm", k_norm="k_norm"),
    "phi3": replace(LLAMA, q="qkv_proj", k="qkv_proj", v="qkv_proj", gate="gate_up_proj", up="gate_up_proj",
                    heads_from_config=True),
    "opt": replace(
        LLAMA, blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", o="out_proj", mlp="", up="fc1", down="fc2", gate=None,
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", prenorm_flag="do_layer_norm_before",
        n_kv_key=None, head_dim_key=None, inter_key="ffn_dim", rotary=None,
    ),
    "gpt2": replace(
        LLAMA, blocks="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
        attn="attn", q="c_attn", k="c_attn", v="c_attn", o="c_proj", mlp="mlp", up="c_fc", down="c_proj", gate=None,
        attn_norm="ln_1", mlp_norm="ln_2", n_kv_key=None, head_dim_key=None, inter_key="n_inner", rotary=None,
        refused="GPT-2 keeps its projections in transposed Conv1D modules, which slimlm's layer formats do not read",
    ),
}

# Checkpoints whose config wraps a supported text model in a multimodal one: refused up front (the
# full vision tower would be loaded first, and the text weights live under another prefix).
MULTIMODAL = {"gemma3": "gemma3_text"}


def arch_for(model_type: str) -> Arch:
    """The table row for ``model_type``, or a clear error listing what is supported."""
    if model_type in MULTIMODAL:
        raise SlimlmError(
            f"{model_type!r} is a multimodal checkpoint (vision tower + {MULTIMODAL[model_type]} text model)",
            f"use a text-only {MULTIMODAL[model_type]} checkpoint (e.g. gemma-3-270m, or save the language model alone)",
        )
    if model_type not in ARCHS:
        supported = sorted(k for k, a in ARCHS.items() if a.refused is None)
        raise SlimlmError(
            f"unknown architecture {model_type!r}",
            f"slimlm supports {', '.join(supported)}; add a row to slimlm/models/arch.py for others",
        )
    arch = ARCHS[model_type]
    if arch.refused:
        raise SlimlmError(f"architecture {model_type!r} is not supported: {arch.refused}",
                          "see docs/architectures.md for the supported families")
    return arch


# --- facts that depend on a checkpoint's config -------------------------------------------------


class Heads(NamedTuple):
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def n_rep(self) -> int:
        """Query heads per K/V head (grouped-query attention)."""
        return self.n_heads // self.n_kv


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def heads(config: Any, arch: Arch) -> Heads:
    cfg = text_config(config)
    n_heads = getattr(cfg, arch.n_heads_key)
    n_kv = getattr(cfg, arch.n_kv_key, None) if arch.n_kv_key else None
    head_dim = getattr(cfg, arch.head_dim_key, None) if arch.head_dim_key else None
    return Heads(n_heads, n_kv or n_heads, head_dim or cfg.hidden_size // n_heads)


def set_widths(config: Any, arch: Arch, h: Heads, intermediate: int) -> None:
    """Write pruned widths into the config, so plain ``from_pretrained`` rebuilds the smaller model."""
    cfg = text_config(config)
    if arch.head_dim_key:
        setattr(cfg, arch.head_dim_key, h.head_dim)  # explicit: no longer derivable from hidden / heads
    setattr(cfg, arch.n_heads_key, h.n_heads)
    if arch.n_kv_key:
        setattr(cfg, arch.n_kv_key, h.n_kv)
    setattr(cfg, arch.inter_key, intermediate)


def is_prenorm(config: Any, arch: Arch) -> bool:
    return arch.prenorm_flag is None or bool(getattr(text_config(config), arch.prenorm_flag, True))


def embed_scale(config: Any, arch: Arch) -> float | None:
    """The factor the embedding module applies to its rows (Gemma: √hidden_size), or None."""
    return text_config(config).hidden_size ** 0.5 if arch.embed_scaled else None


def final_softcap(config: Any, arch: Arch) -> float | None:
    return getattr(text_config(config), arch.final_softcap, None) if arch.final_softcap else None


def per_block_lists(arch: Arch) -> tuple[str, ...]:
    """Config keys holding one entry per block (they must follow the blocks when blocks are removed)."""
    return (arch.layer_types_key,) if arch.layer_types_key else ()


# --- what methods need ----------------------------------------------------------------------------

# Facts a method may rely on beyond the module paths, and what each buys it.
NEEDS = {
    "prenorm": "scale folds need a norm that feeds the linears (pre-norm)",
    "head_dim": "removing heads needs a configurable head size",
}


def unmet(need: str, config: Any, arch: Arch) -> str | None:
    """Why this model cannot provide ``need`` (one line), or None when it can."""
    if need == "prenorm" and not is_prenorm(config, arch):
        return (f"{text_config(config).model_type} with {arch.prenorm_flag}=False is post-norm: its norms sit after the "
                f"residual add, so the folded scales would change the model")
    if need == "head_dim" and arch.head_dim_key is None:
        return f"{text_config(config).model_type} derives head_dim from hidden_size / heads, so removing heads would change it"
    if need not in NEEDS:
        raise ValueError(f"unknown need {need!r}; known: {sorted(NEEDS)}")
    return None


def input_groups(arch: Arch) -> list[tuple[str, ...]]:
    """Block-relative paths of distinct linears that read the very same input tensor (q/k/v; gate/up).

    One input statistic (or one stacked GPTQ solve) serves a whole group; fused projections are
    already one linear, so they form no group.
    """
    return [g for g in (arch.qkv_paths(), arch.gate_up_paths()) if len(g) > 1]


def fused_rows(arch: Arch, path: str, h: Heads, intermediate: int) -> dict[str, slice] | None:
    """Row ranges of the projections packed into a fused linear at block ``path``, or None if unfused."""
    if arch.fused_qkv and path == arch.qkv_paths()[0]:
        nq, nkv = h.n_heads * h.head_dim, h.n_kv * h.head_dim
        return {"q": slice(0, nq), "k": slice(nq, nq + nkv), "v": slice(nq + nkv, nq + 2 * nkv)}
    if arch.fused_gate_up and path == arch.gate_up_paths()[0]:
        return {"gate": slice(0, intermediate), "up": slice(intermediate, 2 * intermediate)}
    return None


# --- module tree helpers --------------------------------------------------------------------------


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


STATE_PREFIX = "slimlm_"  # plain attributes (e.g. pruning marks) that belong to a module's place in the model


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``; slimlm state recorded on the module it replaces moves with it."""
    parent_path, _, leaf = path.rpartition(".")
    parent = get_module(root, parent_path)
    old = getattr(parent, leaf, None)
    if old is not None and old is not module:
        for key, value in vars(old).items():
            if key.startswith(STATE_PREFIX) and key not in vars(module):
                setattr(module, key, value)
    setattr(parent, leaf, module)


def blocks(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)  # type: ignore[return-value]


def block_linears(block: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    """Every distinct linear of a block, by path within the block, in execution order."""
    leaves = [*arch.qkv_paths(), arch.attn_path(arch.o), *arch.gate_up_paths(), arch.mlp_path(arch.down)]
    return {p: block.get_submodule(p) for p in leaves}


def intermediate_size(block: nn.Module, arch: Arch) -> int:
    return block.get_submodule(arch.mlp_path(arch.down)).in_features
