"""ONNX export (onnxruntime): a decoder graph with a KV cache, 4-bit layers as ``MatMulNBits``.

onnxruntime's contrib op ``com.microsoft.MatMulNBits`` computes ``A · ((q − zp) · scale)ᵀ`` per block of
``block_size`` input columns (a power of two ≥ 16; the last block may be partial), with 4-bit codes packed
two per byte, element 2j in the low nibble, and zero points packed the same way per output row. That is
slimlm's grid ``w = s·(q − z)`` with its group as the block, so the calibrated codes and zero points go
in unchanged. Other layers become float ``MatMul``s of their (dequantized) weights.

The graph is built node by node with the ``onnx`` helper API from the model's weights and the
architecture facts in :mod:`slimlm.models.arch`: inputs ``input_ids`` and ``past_key_values.{i}.key|value``
(``[batch, kv_heads, past, head_dim]``), outputs ``logits`` and ``present.{i}.key|value``, so it prefills a
prompt and then decodes token by token. Rotary tables are HF's own (computed by the model's rotary module).
Llama-family models (rotate-half rotary, RMSNorm, SiLU-gated MLP) are supported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.export import ExportResult, atomic_output, path_size, register_writer
from slimlm.layers.embedding import QuantEmbedding, TiedQuantHead
from slimlm.layers.quant import QuantLinear
from slimlm.models.arch import blocks, get_module
from slimlm.models.load import LoadedModel

MODEL_FILE = "model.onnx"
OPSET = 18
ONNX_ARCHS = ("llama", "mistral")


class Graph:
    """A tiny builder over ``onnx.helper``: named initializers and nodes with fresh output names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, values: list[int] | list[float], dtype: Any = np.int64) -> str:
        self.n += 1
        return self.init(f"const_{self.n}", np.array(values, dtype=dtype))

    def op(self, kind: str, inputs: list[str], domain: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self.n += 1
        out = f"{kind.lower()}_{self.n}"
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, domain=domain, **attrs))
        return out


def matmul_nbits_tensors(mod: QuantLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B [N, blocks, bs/2] uint8, scales [N·blocks] f32, zero_points [N·⌈blocks/2⌉] uint8) from slimlm's codes."""
    n, k, bs = mod.out_features, mod.in_features, mod.group_size
    nb = -(-k // bs)
    q = mod.codes().to(torch.uint8).numpy()
    q = np.pad(q, ((0, 0), (0, nb * bs - k))).reshape(n, nb, bs)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    z = mod.zeros.numpy().astype(np.uint8)
    z = np.pad(z, ((0, 0), (0, (-nb) % 2)))
    zp = (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)
    return packed, mod.scales.float().numpy().reshape(-1), zp


def nbits_ok(mod: nn.Module) -> bool:
    bs = getattr(mod, "group_size", 0)
    return isinstance(mod, QuantLinear) and not isinstance(mod, QuantEmbedding) and mod.bits == 4 \
        and bs >= 16 and bs & (bs - 1) == 0


def linear(g: Graph, x: str, name: str, mod: nn.Module) -> tuple[str, str]:
    """``x @ Wᵀ (+ b)``: MatMulNBits for 4-bit codes, else a float MatMul. Returns (output, kind)."""
    if nbits_ok(mod):
        b, s, zp = matmul_nbits_tensors(mod)
        y = g.op("MatMulNBits", [x, g.init(f"{name}.qweight", b), g.init(f"{name}.scales", s), g.init(f"{name}.qzeros", zp)],
                 domain="com.microsoft", K=mod.in_features, N=mod.out_features, bits=4, block_size=mod.group_size)
        kind = "MatMulNBits"
    else:
        w = mod.weight.detach().float().cpu().numpy()
        y = g.op("MatMul", [x, g.init(f"{name}.weight_t", w.T)])
        kind = "MatMul"
    if getattr(mod, "bias", None) is not None:
        y = g.op("Add", [y, g.init(f"{name}.bias", mod.bias.detach().float().numpy())])
    return y, kind


def rms_norm(g: Graph, x: str, weight: torch.Tensor, eps: float, name: str) -> str:
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.const([eps], np.float32)])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.init(f"{name}.weight", weight.detach().float().numpy())])


def rotate(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    """HF rotary: ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = [−x₂, x₁]``."""
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), g.const([3])])
    x2 = g.op("Slice", [x, g.const([half]), g.const([2 * half]), g.const([3])])
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=3)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def build_graph(lm: LoadedModel) -> tuple[Any, dict[str, int]]:
    """The decoder as an ONNX model, plus a count of each linear kind used."""
    from onnx import TensorProto, helper

    model, arch = lm.model, lm.arch
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rep, eps = heads // kv, float(cfg.rms_norm_eps)
    layers = blocks(model, arch)
    g = Graph()
    kinds: dict[str, int] = {}

    def lin(x: str, path: str) -> str:
        y, kind = linear(g, x, path, get_module(model, path))
        kinds[kind] = kinds.get(kind, 0) + 1
        return y

    embed = get_module(model, arch.embed)
    table = (embed.weight_dequantized(torch.float32) if isinstance(embed, QuantEmbedding) else embed.weight.detach().float()).numpy()
    x = g.op("Gather", [g.init("embed.weight", table), "input_ids"])

    # positions past .. past + seq, their rotary rows and the causal mask (query i sees keys ≤ past + i)
    past = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2)], axis=0)
    seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
    total = g.op("Add", [past, seq])
    pos = g.op("Range", [past, total, g.const(1)])
    with torch.no_grad():
        rot_emb = get_module(model, "model.rotary_emb")
        ids = torch.arange(cfg.max_position_embeddings)[None]
        cos_t, sin_t = rot_emb(torch.zeros(1, dtype=torch.float32), ids)
    cos = g.op("Gather", [g.init("rope.cos", cos_t[0].float().numpy()), pos])  # [seq, hd]
    sin = g.op("Gather", [g.init("rope.sin", sin_t[0].float().numpy()), pos])
    later = g.op("Less", [g.op("Unsqueeze", [pos, g.const([1])]), g.op("Unsqueeze", [g.op("Range", [g.const(0), total, g.const(1)]), g.const([0])])])
    mask = g.op("Where", [later, g.const([np.finfo(np.float32).min], np.float32), g.const([0.0], np.float32)])  # [seq, total]
    scale = g.const([1.0 / np.sqrt(hd)], np.float32)

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = []
    for i, block in enumerate(layers):
        p = f"{arch.blocks}.{i}"
        h = rms_norm(g, x, get_module(block, arch.attn_norm).weight, eps, f"{p}.{arch.attn_norm}")
        q = g.op("Transpose", [g.op("Reshape", [lin(h, f"{p}.{arch.attn_path(arch.q)}"), g.const([0, 0, heads, hd])])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [lin(h, f"{p}.{arch.attn_path(arch.k)}"), g.const([0, 0, kv, hd])])], perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [lin(h, f"{p}.{arch.attn_path(arch.v)}"), g.const([0, 0, kv, hd])])], perm=[0, 2, 1, 3])
        q, k = rotate(g, q, cos, sin, hd // 2), rotate(g, k, cos, sin, hd // 2)
        for kind, t in (("key", k), ("value", v)):
            name = f"past_key_values.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv, "past", hd]))
            present = f"present.{i}.{kind}"
            g.nodes.append(helper.make_node("Concat", [name, t], [present], axis=2, name=present))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["batch", kv, "total", hd]))
        k_all, v_all = f"present.{i}.key", f"present.{i}.value"
        if rep > 1:  # grouped-query attention: each KV head serves ``rep`` query heads
            k_all, v_all = (g.op("Reshape", [g.op("Tile", [g.op("Unsqueeze", [t, g.const([2])]), g.const([1, 1, rep, 1, 1])]),
                                             g.const([0, heads, -1, hd])]) for t in (k_all, v_all))
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]), scale]), mask])
        att = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v_all])
        att = g.op("Reshape", [g.op("Transpose", [att], perm=[0, 2, 1, 3]), g.const([0, 0, heads * hd])])
        x = g.op("Add", [x, lin(att, f"{p}.{arch.attn_path(arch.o)}")])
        h = rms_norm(g, x, get_module(block, arch.mlp_norm).weight, eps, f"{p}.{arch.mlp_norm}")
        gate = lin(h, f"{p}.{arch.mlp_path(arch.gate)}")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), lin(h, f"{p}.{arch.mlp_path(arch.up)}")])
        x = g.op("Add", [x, lin(act, f"{p}.{arch.mlp_path(arch.down)}")])
    x = rms_norm(g, x, get_module(model, arch.final_norm).weight, eps, arch.final_norm)
    head = get_module(model, arch.lm_head)
    if isinstance(head, TiedQuantHead) or (isinstance(embed, nn.Embedding) and head.weight is embed.weight):
        flat = g.op("Gemm", [g.op("Reshape", [x, g.const([-1, cfg.hidden_size])]), "embed.weight"], transB=1)
        shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const([-1])], axis=0)
        g.nodes.append(helper.make_node("Reshape", [flat, shape], ["logits"], name="logits"))
    else:
        g.nodes.append(helper.make_node("Identity", [lin(x, arch.lm_head)], ["logits"], name="logits"))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size]))
    graph = helper.make_graph(g.nodes, "slimlm_decoder", inputs, outputs, g.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                   producer_name="slimlm")
    onnx_model.ir_version = 10
    return onnx_model, kinds


@register_writer("onnx")
def write_onnx(lm: LoadedModel, out: Path, *, overwrite: bool = False) -> ExportResult:
    """A folder with ``model.onnx`` (decoder with KV cache), ``config.json`` and the tokenizer."""
    import onnx

    cfg = lm.model.config
    if cfg.model_type not in ONNX_ARCHS:
        raise SlimlmError(f"ONNX export builds llama-family decoders, not {cfg.model_type!r}", "export it as GGUF or compressed-tensors")
    for name, mod in lm.model.named_modules():
        fmt = getattr(mod, "format", None)
        if fmt is not None and not isinstance(mod, (QuantLinear, TiedQuantHead)) and not hasattr(mod, "weight"):
            raise SlimlmError(f"{name} ({fmt}) has no weight to export", "export integer-grid or float layers")
    model, kinds = build_graph(lm)
    with atomic_output(out, overwrite=overwrite, folder=True) as tmp:
        onnx.save(model, str(tmp / MODEL_FILE))
        cfg.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "slimlm_onnx.json").write_text(json.dumps({"inputs": "input_ids, past_key_values.{i}.key|value [batch, kv, past, hd]",
                                                           "outputs": "logits, present.{i}.key|value", "linears": kinds}, indent=1))
    return ExportResult(out, "onnx", path_size(out), {k: str(v) for k, v in kinds.items()})


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime session for an exported folder (or model file)."""
    import onnxruntime as ort

    p = Path(path)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(p / MODEL_FILE if p.is_dir() else p), opts, providers=["CPUExecutionProvider"])


def onnx_generate(sess: Any, ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding through the exported graph: prefill once, then one token per call with the KV cache.

    Returns the new tokens and the prefill's last-position logits.
    """
    feeds: dict[str, np.ndarray] = {"input_ids": np.array([ids], dtype=np.int64)}
    for inp in sess.get_inputs()[1:]:
        _, kv, _, hd = inp.shape
        feeds[inp.name] = np.zeros((1, kv, 0, hd), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    out: list[int] = []
    first = None
    for _ in range(new_tokens):
        res = dict(zip(names, sess.run(None, feeds)))
        last = res["logits"][0, -1]
        first = last if first is None else first
        out.append(int(last.argmax()))
        feeds = {"input_ids": np.array([[out[-1]]], dtype=np.int64)}
        feeds.update({n.replace("present.", "past_key_values."): v for n, v in res.items() if n.startswith("present.")})
    return out, first  # type: ignore[return-value]
