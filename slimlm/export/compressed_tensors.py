"""compressed-tensors export (vLLM, transformers) with slimlm's codes kept byte for byte.

``pack-quantized`` (W4A16, W8A16, any 2–8 bits): compressed-tensors stores signed codes ``q_s`` with
``w = s·(q_s − zp)`` and packs ``q_s + 2^(b−1)`` into int32 along the input dim, low bits first, eight
4-bit codes per word (``weight_packed``); asymmetric zero points are packed the same way along the output
dim (``weight_zero_point``). slimlm's unsigned codes ``q`` with ``w = s·(q − z)`` are exactly
``q_s = q − 2^(b−1)``, ``zp = z − 2^(b−1)``, so the packed words hold slimlm's codes unchanged.
``int-quantized`` (W8A8, SmoothQuant's :class:`~slimlm.layers.int8.Int8Linear`): int8 ``weight`` with a
per-channel ``weight_scale`` and dynamic per-token int8 activations.

Scales are written in float32 (the exact values of slimlm's fp16 scales), other tensors in the model's
dtype, ``config.json`` gets the ``quantization_config`` transformers and vLLM read.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export import ExportResult, atomic_output, path_size, register_writer
from slimlm.layers.embedding import QuantEmbedding, TiedQuantHead
from slimlm.layers.int8 import Int8Linear
from slimlm.layers.quant import QuantLinear
from slimlm.models.load import LoadedModel

WEIGHTS = "model.safetensors"


def pack_int32(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values packed into int32 words along ``dim`` (0 or 1), lowest bits first, zero-padded."""
    v = values.to(torch.int64)
    if dim == 0:
        return pack_int32(v.t(), bits, 1).t().contiguous()
    per = 32 // bits
    pad = (-v.shape[1]) % per
    v = torch.nn.functional.pad(v, (0, pad)).reshape(v.shape[0], -1, per)
    words = (v << (bits * torch.arange(per, dtype=torch.int64))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quant_args(mod: QuantLinear) -> dict[str, Any]:
    symmetric = bool((mod.zeros == 2 ** (mod.bits - 1)).all())
    strategy = "channel" if mod.group_size >= mod.in_features else "group"
    return {"num_bits": mod.bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": None if strategy == "channel" else mod.group_size, "dynamic": False,
            "actorder": None, "observer": "minmax", "block_structure": None, "observer_kwargs": {}}


W8A8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None,
                "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None, "observer_kwargs": {}}
W8A8_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
               "dynamic": True, "actorder": None, "observer": None, "block_structure": None, "observer_kwargs": {}}


def layer_tensors(name: str, mod: nn.Module, pad_zero_points: bool = False) -> dict[str, torch.Tensor]:
    """The compressed-tensors parameters of one slimlm layer.

    ``pad_zero_points``: pad the packed zero points with zero rows to the unpacked shape (out, groups).
    Decompression reads only the leading packed rows, so the values are the same; the shape is what
    transformers 5.24 + compressed-tensors 0.20 expect (they build that parameter unpacked on the meta
    device, vllm-project/llm-compressor#1618), not what vLLM expects.
    """
    if isinstance(mod, Int8Linear):
        out = {f"{name}.weight": mod.qweight.contiguous(), f"{name}.weight_scale": mod.w_scale.float()[:, None].contiguous()}
    else:
        out = {f"{name}.weight_packed": pack_int32(mod.codes(), mod.bits, dim=1),
               f"{name}.weight_scale": mod.scales.float().contiguous(),
               f"{name}.weight_shape": torch.tensor([mod.out_features, mod.in_features], dtype=torch.int32)}
        if not quant_args(mod)["symmetric"]:
            zp = pack_int32(mod.zeros.to(torch.int64), mod.bits, dim=0)
            if pad_zero_points:
                zp = torch.nn.functional.pad(zp, (0, 0, 0, mod.out_features - zp.shape[0]))
            out[f"{name}.weight_zero_point"] = zp
    if getattr(mod, "bias", None) is not None:
        out[f"{name}.bias"] = mod.bias.detach().contiguous()
    return out


def _group_key(args: dict[str, Any], inputs: dict[str, Any] | None) -> str:
    return json.dumps([args, inputs], sort_keys=True)


@register_writer("compressed-tensors")
def write_compressed_tensors(lm: LoadedModel, out, *, overwrite: bool = False, zero_points: str = "packed") -> ExportResult:
    """A Hugging Face folder whose quantized linears are compressed-tensors ``pack-quantized`` / ``int-quantized``.

    ``zero_points``: ``packed`` (the format's layout, what vLLM loads) or ``padded`` (same values padded to
    the shape transformers 5.24 + compressed-tensors 0.20 load; see :func:`layer_tensors`).
    """
    if zero_points not in ("packed", "padded"):
        raise SlimlmError(f"zero_points {zero_points!r} is not a layout", "use packed (vLLM) or padded (transformers 5.24)")
    model = lm.model
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    formats: set[str] = set()
    handled: list[str] = []
    types: dict[str, str] = {}
    for name, mod in model.named_modules():
        if any(name.startswith(h + ".") for h in handled):
            continue
        fmt = getattr(mod, "format", None)
        if isinstance(mod, (QuantEmbedding, TiedQuantHead)):
            handled.append(name)
            if isinstance(mod, QuantEmbedding):  # no compressed-tensors embedding format: the dequantized table, exact values
                tensors[f"{name}.weight"] = mod.weight_dequantized(torch.float32)
                types[name] = "dense (dequantized 8-bit table)"
            continue
        if isinstance(mod, QuantLinear) or isinstance(mod, Int8Linear):
            handled.append(name)
            if isinstance(mod, QuantLinear) and mod.in_features % mod.group_size:
                raise SlimlmError(f"{name}: group_size {mod.group_size} leaves a partial last group of in_features "
                                  f"{mod.in_features}, which compressed-tensors cannot hold (it needs strict division)",
                                  "quantize with a group size that divides every input size (e.g. 64 or 32 on SmolLM2), "
                                  "or export as --format gguf / onnx, which hold partial groups")
            args, inputs = (W8A8_WEIGHTS, W8A8_INPUTS) if isinstance(mod, Int8Linear) else (quant_args(mod), None)
            formats.add("int-quantized" if isinstance(mod, Int8Linear) else "pack-quantized")
            g = groups.setdefault(_group_key(args, inputs), {"targets": [], "weights": args, "input_activations": inputs,
                                                              "output_activations": None, "format": None})
            g["targets"].append(name)
            tensors.update(layer_tensors(name, mod, zero_points == "padded"))
            types[name] = f"W{args['num_bits']}A{8 if inputs else 16}"
            continue
        if fmt is not None:
            raise SlimlmError(f"{name} is stored as {fmt}, which compressed-tensors export does not carry",
                              "export integer-grid layers (rtn, gptq, awq, smoothquant), or use --format gguf --requantize TYPE")
        for pname, p in mod.named_parameters(recurse=False):
            tensors.setdefault(f"{name}.{pname}", p.detach().contiguous())
    if not groups:
        raise SlimlmError(f"{lm.info.source} has no quantized linear layers to compress",
                          "compress it first (e.g. recipes/gptq4.yaml), or save it as a plain checkpoint")
    if len(formats) > 1:
        raise SlimlmError("the model mixes W8A8 and weight-only layers; one compressed-tensors format holds one kind",
                          "export a model quantized one way")
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        tensors.pop("lm_head.weight", None)
    config_groups = {}
    for i, g in enumerate(groups.values()):
        g["targets"] = ["re:^(" + "|".join(re.escape(t) for t in g["targets"]) + ")$"]
        config_groups[f"group_{i}"] = g
    qcfg = {"quant_method": "compressed-tensors", "format": formats.pop(), "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None}
    seen: dict[int, str] = {}
    for k in list(tensors):  # safetensors refuses shared storage: keep tied tensors once
        ptr = tensors[k].untyped_storage().data_ptr()
        if ptr in seen and tensors[k].numel():
            tensors[k] = tensors[k].clone()
        seen[ptr] = k
    with atomic_output(out, overwrite=overwrite, folder=True) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(str(tmp))
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        lm.tokenizer.save_pretrained(str(tmp))
    return ExportResult(out, "compressed-tensors", path_size(out), types)
