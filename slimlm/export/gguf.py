"""GGUF export (llama.cpp) with slimlm's calibrated codes written into GGUF blocks as they are.

llama.cpp's block-32 types hold slimlm's integer grids ``w = s·(q − z)`` exactly (ggml-common.h):
Q4_0 ``w = d·(q − 8)``, Q4_1 ``w = d·q + m``, Q5_0 ``w = d·(q − 16)``, Q5_1 ``w = d·q + m``,
Q8_0 ``w = d·q`` (int8 q). So with ``d = s`` and ``m = −s·z`` (the only rounding: ``m`` to fp16, under
half a step's 1/1000 here) a group of 32, 64 or 128 columns becomes 1, 2 or 4 blocks that all repeat
its scale, and a partial last group aligned to 32 is just fewer blocks. The codes are repacked into
GGUF's nibble order (byte j holds element j in its low and j + 16 in its high nibble).

``convert_hf_to_gguf.py`` instead dequantizes GPTQ checkpoints and rounds them again with llama.cpp's
own quantizer, which discards the calibration. Formats no GGUF type holds as they are (3-bit, NF4,
sparse, low-rank, …) are refused naming the layer and the option, or — with ``requantize`` — written
exactly when that type can hold the codes, else dequantized and rounded by gguf-py's quantizer with the
added error reported.

Tokenizer: copied key for key from the GGUF the model descends from (``default``, ``gemma3-270m`` and
``.gguf`` sources, through any chain of artifacts), which is what transformers built its tokenizer from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export import ExportResult, atomic_output, path_size, register_writer
from slimlm.layers.embedding import TiedQuantHead
from slimlm.layers.int8 import Int8Linear
from slimlm.layers.quant import QuantLinear
from slimlm.models.load import BUILTIN_SOURCES, MANIFEST, LoadedModel


@dataclass(frozen=True)
class GgufArch:
    """How an HF family maps onto a llama.cpp architecture."""

    name: str  # llama.cpp architecture name
    permute_qk: bool  # llama.cpp's llama arch rotates adjacent pairs, HF rotates halves: reorder q/k rows


GGUF_ARCHS = {"llama": GgufArch("llama", True), "mistral": GgufArch("llama", True),
              "gemma3_text": GgufArch("gemma3", False)}
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # what gguf-py's quantizer writes (bit-exact with C)
BLOCK = 32
# type → (offset added to q − z, inclusive code range) for the exact mapping; Q4_1/Q5_1 store q itself
_OFFSET = {"Q4_0": (8, 15), "Q5_0": (16, 31), "Q8_0": (0, None)}
_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}


def _qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


# ---------------------------------------------------------------- exact blocks from integer codes

def block_params(scales: torch.Tensor, zeros: torch.Tensor, group_size: int, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-32-block scale (fp16) and zero point (int) of a group grid: (out, in/32) each."""
    starts = np.arange(0, in_features, BLOCK)
    groups = starts // group_size
    return scales.cpu().numpy().astype(np.float16)[:, groups], zeros.cpu().numpy().astype(np.int32)[:, groups]


def blocks_fit(in_features: int, group_size: int) -> bool:
    """Every 32-block lies inside one group (and rows are whole blocks)."""
    return in_features % BLOCK == 0 and (group_size % BLOCK == 0 or group_size >= in_features)


def codes_fit(gtype: str, codes: np.ndarray, zeros: np.ndarray, bits: int) -> bool:
    """Whether ``gtype`` holds every code exactly (``codes`` (out, nb, 32), ``zeros`` (out, nb))."""
    if gtype in ("Q4_1", "Q5_1"):
        return bits <= _BITS[gtype]
    off, hi = _OFFSET[gtype]
    v = codes - zeros[..., None] + off
    lo, hi = (-128, 127) if hi is None else (0, hi)
    return bool(v.min() >= lo and v.max() <= hi)


def pack_blocks(gtype: str, codes: np.ndarray, d: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """GGUF blocks of ``gtype`` from codes (out, nb, 32), scales d (out, nb) fp16, zeros (out, nb): (out, nb·size) uint8."""
    rows, nb, _ = codes.shape
    parts = [np.ascontiguousarray(d, dtype=np.float16).view(np.uint8).reshape(rows, nb, 2)]
    if gtype in ("Q4_1", "Q5_1"):
        m = (-(d.astype(np.float32) * zeros)).astype(np.float16)
        parts.append(np.ascontiguousarray(m).view(np.uint8).reshape(rows, nb, 2))
        q = codes
    else:
        q = codes - zeros[..., None] + _OFFSET[gtype][0]
    if gtype == "Q8_0":
        parts.append(np.ascontiguousarray(q, dtype=np.int8).view(np.uint8))
    else:
        q = q.astype(np.uint8)
        if gtype in ("Q5_0", "Q5_1"):
            parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))  # qh: bit j = bit 4 of element j
        lo = q & 0xF
        parts.append(lo[..., :16] | (lo[..., 16:] << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def native_type(bits: int, codes: np.ndarray, zeros: np.ndarray) -> str | None:
    """The smallest GGUF type that holds these codes exactly by default (None: no native type)."""
    options = {4: ("Q4_0", "Q4_1"), 5: ("Q5_0", "Q5_1"), 8: ("Q8_0",)}.get(bits, ())
    return next((t for t in options if codes_fit(t, codes, zeros, bits)), None)


# ---------------------------------------------------------------- one tensor

@dataclass
class Tensor:
    data: np.ndarray  # raw bytes (uint8) for block types, else floats
    gtype: str
    error: float | None = None  # relative error a re-rounding added (None: exact)


def float_tensor(w: torch.Tensor, gtype: str) -> Tensor:
    """A float matrix as F32/F16/BF16, or rounded by gguf-py's quantizer (error reported)."""
    from gguf import quants

    w32 = w.detach().float().cpu().numpy()
    if gtype == "F32":
        return Tensor(w32, gtype)
    if gtype == "F16":
        return Tensor(w32.astype(np.float16), gtype)
    raw = quants.quantize(w32, _qtype(gtype))
    err = None
    if gtype != "BF16":
        back = quants.dequantize(raw, _qtype(gtype))
        err = float(np.linalg.norm(back - w32) / max(np.linalg.norm(w32), 1e-30))
    return Tensor(raw, gtype, err)


def int_grid(mod: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(codes (out, nb, 32), d (out, nb), zeros (out, nb), bits) of an integer-grid layer, or None if not 32-tileable."""
    if isinstance(mod, QuantLinear):  # QuantEmbedding too
        if not blocks_fit(mod.in_features, mod.group_size):
            return None
        d, z = block_params(mod.scales, mod.zeros, mod.group_size, mod.in_features)
        codes = mod.codes().cpu().numpy().astype(np.int32).reshape(mod.out_features, -1, BLOCK)
        return codes, d, z, mod.bits
    if isinstance(mod, Int8Linear):  # symmetric int8 per output channel: q − z with z = 0
        if mod.in_features % BLOCK:
            return None
        nb = mod.in_features // BLOCK
        d = np.repeat(mod.w_scale.cpu().numpy().astype(np.float16)[:, None], nb, axis=1)
        codes = mod.qweight.cpu().numpy().astype(np.int32).reshape(mod.out_features, nb, BLOCK)
        return codes, d, np.zeros_like(d, dtype=np.int32), 8
    return None


def layer_tensor(name: str, mod: nn.Module, requantize: str | None) -> Tensor:
    """A slimlm layer format as a GGUF tensor: exact blocks, or a refusal naming the option, or re-rounded."""
    grid = int_grid(mod)
    if grid is not None:
        codes, d, z, bits = grid
        gtype = native_type(bits, codes, z)  # --requantize is only for layers with no native type
        if gtype is None and requantize in QUANT_TYPES and codes_fit(requantize, codes, z, bits):
            gtype = requantize
        if gtype is not None:
            return Tensor(pack_blocks(gtype, codes, d, z), gtype)
    if requantize is None:
        raise SlimlmError(f"{name} ({_describe(mod)}) has no exact GGUF type", _nearest(mod, grid))
    return float_tensor(mod.weight, requantize)


def _describe(mod: nn.Module) -> str:
    if isinstance(mod, QuantLinear):
        return f"{mod.bits}-bit codes, group {mod.group_size}, in_features {mod.in_features}"
    return getattr(mod, "format", type(mod).__name__)


def _nearest(mod: nn.Module, grid: tuple | None) -> str:
    """The refusal's fix: the type that keeps the codes exactly where one exists, else the nearest re-rounding."""
    if grid is not None:
        codes, _, z, bits = grid
        exact = [t for t in QUANT_TYPES if codes_fit(t, codes, z, bits)]
        if exact:
            return f"pass --requantize {exact[0]} (holds these codes exactly, {_bpw(exact[0]):.1f} bits/weight)"
        if bits == 8:
            return "re-run the step with symmetric: true (exact Q8_0), or pass --requantize Q8_0 (re-rounds, error reported)"
    if isinstance(mod, QuantLinear) and not blocks_fit(mod.in_features, mod.group_size):
        return (f"GGUF blocks are 32 columns: use group_size 32/64/128/-1 on a row of a multiple of 32, "
                f"or pass --requantize Q4_1 | Q8_0 | F16 (re-rounds, error reported)")
    return "pass --requantize Q4_0 | Q4_1 | Q8_0 | F16 to dequantize and write that type (error reported)"


def _bpw(gtype: str) -> float:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_qtype(gtype)]
    return 8 * size / block


# ---------------------------------------------------------------- model walk

def qk_row_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order llama.cpp's llama arch expects for q/k: each head's halves interleaved into pairs."""
    return torch.arange(n_heads * head_dim).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def permute_rows(mod: nn.Module, order: torch.Tensor) -> nn.Module:
    """A copy of a linear layer with output rows reordered (codes, scales, zeros or weights alike)."""
    if isinstance(mod, QuantLinear):
        out = QuantLinear(mod.in_features, mod.out_features, mod.bits, mod.group_size, mod.bias is not None)
        from slimlm.layers.quant import pack_bits

        out.qweight = pack_bits(mod.codes()[order], mod.bits)
        out.scales, out.zeros = mod.scales[order], mod.zeros[order]
    elif isinstance(mod, Int8Linear):
        out = Int8Linear(mod.in_features, mod.out_features, mod.bias is not None)
        out.qweight, out.w_scale = mod.qweight[order], mod.w_scale[order]
    elif isinstance(mod, nn.Linear):
        out = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        out.weight = nn.Parameter(mod.weight.detach()[order])
    elif callable(getattr(mod, "weight_dequantized", None)):
        return _Reordered(mod, order)
    else:
        raise SlimlmError(f"cannot reorder the rows of a {_describe(mod)} layer for llama.cpp's rotary layout",
                          "export it with --format onnx or compressed-tensors, or leave q/k out of that step")
    if mod.bias is not None:
        out.bias = nn.Parameter(mod.bias.detach()[order])
    return out


class _Reordered(nn.Module):
    """A q/k layer whose format has no exact row permutation (NF4, …), seen through its dequantized weight
    with rows reordered: refused like the layer itself, or re-rounded with ``--requantize``."""

    def __init__(self, inner: nn.Module, order: torch.Tensor) -> None:
        super().__init__()
        self.format, self.order = getattr(inner, "format", type(inner).__name__), order
        self.inner = inner
        self.bias = None if getattr(inner, "bias", None) is None else nn.Parameter(inner.bias.detach()[order])

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight_dequantized(torch.float32)[self.order]


def _hf_tensors(lm: LoadedModel) -> list[tuple[str, nn.Module | torch.Tensor]]:
    """(HF tensor name, layer or float tensor) in module order; tied heads and duplicates left out."""
    model, arch = lm.model, lm.arch
    cfg = model.config
    garch = GGUF_ARCHS[cfg.model_type]
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    embed = model.get_submodule(arch.embed)
    head = model.get_submodule(arch.lm_head)
    tied = isinstance(head, TiedQuantHead) or (isinstance(embed, nn.Embedding) and head.weight is embed.weight)
    out: list[tuple[str, nn.Module | torch.Tensor]] = []
    seen: set[int] = set()
    skip_under: list[str] = []
    for mname, mod in model.named_modules():
        if any(mname.startswith(p + ".") for p in skip_under):
            continue
        if mname == arch.lm_head and tied:
            continue
        if getattr(mod, "format", None) is not None or isinstance(mod, (nn.Linear, nn.Embedding)):
            skip_under.append(mname)
            if garch.permute_qk and mname.startswith(arch.blocks + "."):
                leaf = mname.split(".", len(arch.blocks.split(".")) + 1)[-1]
                if leaf in (arch.attn_path(arch.q), arch.attn_path(arch.k)):
                    n = heads if leaf == arch.attn_path(arch.q) else kv
                    mod = permute_rows(mod, qk_row_order(n, head_dim))
            if isinstance(mod, (nn.Linear, nn.Embedding)) and getattr(mod, "format", None) is None:
                if id(mod.weight) in seen:
                    continue
                seen.add(id(mod.weight))
                out.append((f"{mname}.weight", mod.weight.detach()))
                if getattr(mod, "bias", None) is not None:
                    out.append((f"{mname}.bias", mod.bias.detach()))
            else:
                out.append((f"{mname}.weight", mod))
                if getattr(mod, "bias", None) is not None:
                    out.append((f"{mname}.bias", mod.bias.detach()))
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            t = p.detach()
            if arch.norm_offset and "norm" in type(mod).__name__.lower():
                t = t.float() + arch.norm_offset  # llama.cpp's gemma norms multiply by w itself, HF by (offset + w)
            out.append((f"{mname}.{pname}", t))
    return out


# ---------------------------------------------------------------- metadata

def _rope(cfg: Any, layer_type: str | None = None) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    elif isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", "default")
    if kind not in ("default", None):
        raise SlimlmError(f"rope type {kind!r} is not exported to GGUF yet", "export a model with default rotary embeddings")
    return {"theta": float(theta)}


def add_hparams(w: Any, lm: LoadedModel) -> None:
    """Architecture hyper-parameters from the (possibly pruned) config."""
    cfg = lm.model.config
    a = GGUF_ARCHS[cfg.model_type].name
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    n_layers = len(lm.model.get_submodule(lm.arch.blocks))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(heads))
    w.add_head_count_kv(int(cfg.num_key_value_heads))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(_rope(cfg)["theta"])
    w.add_vocab_size(int(cfg.vocab_size))
    if a == "llama":
        w.add_rope_dimension_count(int(head_dim))
    if a == "gemma3":
        scalar = getattr(cfg, "query_pre_attn_scalar", head_dim)
        if scalar != head_dim:
            raise SlimlmError(f"query_pre_attn_scalar {scalar} ≠ head_dim {head_dim}: llama.cpp's gemma3 scales by 1/√head_dim",
                              "export a Gemma-3 model with query_pre_attn_scalar equal to head_dim")
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))
            types = getattr(cfg, "layer_types", None) or []
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])  # per kept layer (layer drop)
            w.add_float32(f"{a}.rope.freq_base_swa", _rope(cfg, "sliding_attention")["theta"])
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def source_gguf(lm: LoadedModel) -> Path | None:
    """The GGUF file this model descends from (through artifacts), whose tokenizer llama.cpp should use."""
    src, kind = lm.info.source, lm.info.source_kind
    for _ in range(16):  # an artifact's manifest names its source; follow the chain
        if src in BUILTIN_SOURCES:
            return BUILTIN_SOURCES[src]()
        path = Path(src)
        if path.suffix == ".gguf" and path.is_file():
            return path
        if path.is_dir() and (path / MANIFEST).is_file():
            src = json.loads((path / MANIFEST).read_text())["source"]["path"]
            continue
        return None
    return None


def copy_tokenizer(w: Any, lm: LoadedModel) -> None:
    """Every ``tokenizer.*`` key of the source GGUF, unchanged (vocab, merges/scores, types, specials, BOS policy, template)."""
    from gguf import GGUFReader, GGUFValueType

    path = source_gguf(lm)
    if path is None:
        raise SlimlmError(f"{lm.info.source} does not descend from a GGUF file, so there is no llama.cpp tokenizer to carry over",
                          "export a model loaded from `default`, `gemma3-270m`, a .gguf file, or an artifact made from one")
    reader = GGUFReader(path)
    n_tokens = 0
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        val = f.contents()
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, val, GGUFValueType.ARRAY, sub_type=f.types[-1])
            n_tokens = len(val) if key == "tokenizer.ggml.tokens" else n_tokens
        else:
            w.add_key_value(key, val, f.types[0])
    if n_tokens != lm.model.config.vocab_size:
        raise SlimlmError(f"{path} has {n_tokens} tokens but the model's vocabulary is {lm.model.config.vocab_size}",
                          "export from the GGUF the model was made from")


FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0"}


@register_writer("gguf")
def write_gguf(lm: LoadedModel, out: Path, *, overwrite: bool = False, type: str = "F16",
               requantize: str | None = None) -> ExportResult:
    """Write ``lm`` as one GGUF file. ``type``: float matrices (F16, BF16, F32, or a block type rounded
    by gguf-py); ``requantize``: the type for layers GGUF cannot hold as they are."""
    import gguf

    model_type = lm.model.config.model_type
    if model_type not in GGUF_ARCHS:
        raise SlimlmError(f"GGUF export does not know architecture {model_type!r}", f"supported: {', '.join(sorted(GGUF_ARCHS))}")
    type, requantize = type.upper(), requantize.upper() if requantize else None
    for opt, val in (("--type", type), ("--requantize", requantize)):
        if val is not None and val not in FLOAT_TYPES + QUANT_TYPES:
            raise SlimlmError(f"{opt} {val} is not a GGUF type slimlm writes", f"use one of {', '.join(FLOAT_TYPES + QUANT_TYPES)}")
    garch = GGUF_ARCHS[model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[garch.name.upper()], len(lm.model.get_submodule(lm.arch.blocks)))
    tensors: list[tuple[str, Tensor]] = []
    for hf_name, src in _hf_tensors(lm):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SlimlmError(f"{hf_name} has no GGUF name for architecture {garch.name}", "export a standard decoder of a supported family")
        if isinstance(src, nn.Module):
            t = layer_tensor(hf_name, src, requantize)
        elif src.ndim == 1:
            t = Tensor(src.float().cpu().numpy(), "F32")
        else:
            fits = src.shape[-1] % BLOCK == 0 or type in FLOAT_TYPES
            t = float_tensor(src, type if fits else "F16")
        tensors.append((name, t))
    counts: dict[str, int] = {}
    for _, t in tensors:
        if t.data.ndim == 2:
            counts[t.gtype] = counts.get(t.gtype, 0) + t.data.size
    main = max(counts, key=counts.get) if counts else "F32"  # type: ignore[arg-type]
    with atomic_output(out, overwrite=overwrite, folder=False) as tmp:
        w = gguf.GGUFWriter(str(tmp), garch.name)
        w.add_name(Path(lm.info.source).name or "slimlm")
        w.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[main]]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(w, lm)
        copy_tokenizer(w, lm)
        for name, t in tensors:
            raw = None if t.gtype in ("F32", "F16") else _qtype(t.gtype)
            w.add_tensor(name, np.ascontiguousarray(t.data), raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    errors = {n: t.error for n, t in tensors if t.error is not None}
    notes = [f"{len(errors)} tensors re-rounded by gguf's quantizer (worst relative error "
             f"{max(errors.values()):.4f})"] if errors else []
    return ExportResult(out, "gguf", path_size(out), {n: t.gtype for n, t in tensors}, errors, notes)


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name → (type, raw data) of every tensor, read back with gguf's own reader (opened once: it parses the vocab)."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in GGUFReader(path).tensors}


def unpack_q_blocks(gtype: str, raw: np.ndarray) -> np.ndarray:
    """Codes of GGUF blocks as stored (Q4_1/Q5_1: q; Q4_0/Q5_0: q − z + offset; Q8_0: int8) — (rows, cols)."""
    from gguf import GGML_QUANT_SIZES

    _, size = GGML_QUANT_SIZES[_qtype(gtype)]
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, size)
    head = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 2, "Q5_1": 4, "Q8_0": 2}[gtype]
    if gtype == "Q8_0":
        return b[..., head:].view(np.int8).reshape(rows, -1).astype(np.int32)
    qh = None
    if gtype in ("Q5_0", "Q5_1"):
        qh = np.unpackbits(b[..., head:head + 4], axis=-1, bitorder="little")
        head += 4
    qs = b[..., head:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(np.int32)
    if qh is not None:
        q |= qh.astype(np.int32) << 4
    return q.reshape(rows, -1)

