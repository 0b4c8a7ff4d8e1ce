"""Architecture knowledge as data: where blocks, attention, MLP, norms and embeddings live.

Adding a family is adding a row here; no algorithm branches on the model family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class Arch:
    """Module paths (relative to the model, or to one block) for a decoder-only family."""

    blocks: str  # ModuleList of decoder blocks
    embed: str
    final_norm: str
    lm_head: str
    attn: str  # attention submodule of a block
    q: str
    k: str
    v: str
    o: str
    mlp: str  # MLP submodule of a block
    up: str
    down: str
    gate: str | None  # None for non-gated MLPs (OPT)
    attn_norm: str  # norm feeding q/k/v
    mlp_norm: str  # norm feeding gate/up
    wants_bos: bool  # prepend BOS to every evaluation window
    norm_offset: float = 0.0  # Gemma's RMSNorm computes x * (1 + w): scaling must respect the offset
    rotary: str | None = "model.rotary_emb"  # the model's rotary-embedding module (None: no RoPE, e.g. OPT)
    q_norm: str | None = None  # per-head RMSNorm of queries/keys inside the attention (Gemma-3, Qwen3)
    k_norm: str | None = None
    attn_out_norm: str | None = None  # norm of the attention output before the residual add (Gemma)
    mlp_out_norm: str | None = None  # norm of the MLP output before the residual add (Gemma)

    def attn_path(self, leaf: str) -> str:
        return f"{self.attn}.{leaf}"

    def mlp_path(self, leaf: str) -> str:
        return f"{self.mlp}.{leaf}"


LLAMA = Arch(
    blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj",
    mlp="mlp", up="up_proj", down="down_proj", gate="gate_proj",
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", wants_bos=False,
)

ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": replace(LLAMA, q_norm="q_norm", k_norm="k_norm"),
    "gemma3_text": replace(LLAMA, mlp_norm="pre_feedforward_layernorm", wants_bos=True, norm_offset=1.0,
                           q_norm="q_norm", k_norm="k_norm", attn_out_norm="post_attention_layernorm",
                           mlp_out_norm="post_feedforward_layernorm"),
    "gemma2": replace(LLAMA, mlp_norm="pre_feedforward_layernorm", wants_bos=True, norm_offset=1.0,
                      attn_out_norm="post_attention_layernorm", mlp_out_norm="post_feedforward_layernorm"),
    "opt": replace(
        LLAMA, blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", o="out_proj", mlp="", up="fc1", down="fc2", gate=None,
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", wants_bos=True, rotary=None,
    ),
}


def input_groups(arch: Arch) -> list[tuple[str, ...]]:
    """Block-relative paths of linears that read the very same input tensor (q/k/v; gate/up).

    One input statistic (or one stacked GPTQ solve) serves a whole group.
    """
    groups = [(arch.attn_path(arch.q), arch.attn_path(arch.k), arch.attn_path(arch.v))]
    if arch.gate:
        groups.append(tuple(f"{arch.mlp}.{n}" if arch.mlp else n for n in (arch.gate, arch.up)))
    return groups


def arch_for(model_type: str) -> Arch:
    """The table row for ``model_type``, or a clear error listing what is supported."""
    if model_type not in ARCHS:
        raise SlimlmError(
            f"unknown architecture {model_type!r}",
            f"slimlm supports {', '.join(sorted(ARCHS))}; add a row to slimlm/models/arch.py for others",
        )
    return ARCHS[model_type]


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(get_module(root, parent_path), leaf, module)


def blocks(model: nn.Module, arch: Arch) -> nn.ModuleList:
    return model.get_submodule(arch.blocks)  # type: ignore[return-value]


def block_linears(block: nn.Module, arch: Arch) -> dict[str, nn.Module]:
    """Every linear of a block, by path within the block, in execution order."""
    leaves = [arch.attn_path(n) for n in (arch.q, arch.k, arch.v, arch.o)]
    mlp = [arch.gate, arch.up, arch.down]
    leaves += [f"{arch.mlp}.{n}" if arch.mlp else n for n in mlp if n]
    return {p: block.get_submodule(p) for p in leaves}
