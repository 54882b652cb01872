"""decode.onnx / prefill.onnx for a Llama-family model over the compressed cache.

Emitted straight from the model's weights (fp32 initializers) with onnx.helper: no
tracing, so a 135M model builds in seconds. The graph mirrors ReferenceModel._segment:
new K/V are rounded as the sinks/residual store them (fp16, or 8-bit codes with
policy.residual "u8"; these are outputs the runtime writes into those buffers),
attention over [sinks | ring in slot order | residual | new tokens] is the `edgekv`
CompressedAttention function, and only the last token's logits are made.

Host-side contract (batch 1): the runtime passes the RoPE position and validity of every
cache slot in storage order (`cache_positions`, `cache_valid`), so the graph never
reorders or copies the cache.

Save with onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
location=...): weights go to one side file, so the 2 GB protobuf limit only bounds the
graph itself (onnx.save converts before serialising; note it appends to an existing
data file and strips the tensors from `m` in memory).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekv.errors import UnsupportedModelError
from edgekv.export.onnx_units import split_attention, unit_attention, unit_buffers
from edgekv.export.onnx_ops import DOMAIN, F16, F32, Emitter, opset_imports
from edgekv.export.onnx_pack import IR_VERSION
from edgekv.export.onnx_plain import plain_types, read_plain, store_new
from edgekv.policy import CachePolicy, KVShape, plain_names
from edgekv.reference.model import check_supported, kv_shape

_ONNX_DTYPES = {"float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}


def cache_slots(policy: CachePolicy, shape: KVShape, context: int | None = None) -> int:
    """L = S + W + B: the cache slots `cache_positions` / `cache_valid` describe."""
    return policy.sinks + policy.ring_capacity(context) + policy.block


def cache_inputs(policy: CachePolicy, shape: KVShape, context: int | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, numpy dtype) of every cache buffer input, in graph order: `past.{unit}.`
    for each cache unit (a layer, unless policy.units splits layers by head)."""
    return [(f"past.{u}.{t.name}", t.shape, t.dtype)
            for u in range(policy.num_units) for t in policy.layer_tensors(shape, u, context, batch=1)]


class _Weights:
    """fp32 initializers, one per distinct tensor (tied lm_head/embeddings are stored once)."""

    def __init__(self) -> None:
        self.tensors: list[onnx.TensorProto] = []
        self._by_ptr: dict[tuple, str] = {}

    def add(self, name: str, t) -> str:
        key = (t.data_ptr(), tuple(t.shape))
        if key not in self._by_ptr:
            arr = np.ascontiguousarray(t.detach().float().cpu().numpy())
            self.tensors.append(numpy_helper.from_array(arr, name))
            self._by_ptr[key] = name
        return self._by_ptr[key]


def _linear(e: Emitter, w: _Weights, x: str, mod, name: str) -> str:
    """x [T,in] @ W^T (+ b) with Gemm(transB=1): weights keep the torch layout."""
    args = [x, w.add(f"{name}.weight", mod.weight)]
    if getattr(mod, "bias", None) is not None:
        args.append(w.add(f"{name}.bias", mod.bias))
    return e.op("Gemm", *args, transB=1)


def _rmsnorm(e: Emitter, w: _Weights, x: str, mod, name: str) -> str:
    eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps")
    var = e.op("ReduceMean", e.op("Mul", x, x), e.i64(-1), keepdims=1)
    inv = e.op("Reciprocal", e.op("Sqrt", e.op("Add", var, e.f32(eps))))
    return e.op("Mul", e.op("Mul", x, inv), w.add(f"{name}.weight", mod.weight))


def _check_model(model) -> None:
    check_supported(model.config)
    act = getattr(model.config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"MLP activation {act!r} is not supported (only silu)")
    rope = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope == "dynamic":
        raise UnsupportedModelError("dynamic RoPE scaling changes inv_freq with length: not exportable")


def build_decoder(model, policy: CachePolicy, tokens: int, context: int | None = None) -> onnx.ModelProto:
    """tokens=1: decode.onnx; tokens=C: prefill.onnx (C new tokens, causal in the chunk).
    `context` sizes the ring only for a window-less policy. See the module doc for I/O."""
    _check_model(model)
    cfg, m = model.config, model.model
    shape = kv_shape(cfg)
    policy.check_shape(shape)
    hq, hkv, d, t = cfg.num_attention_heads, shape.num_kv_heads, shape.head_dim, tokens
    n_cache = cache_slots(policy, shape, context)
    e, w = Emitter(), _Weights()

    # Positions, RoPE tables and mask are shared by all layers.
    pos = e.op("Cast", e.op("Concat", "cache_positions", "new_positions", axis=0), to=F32)
    inv_freq = m.rotary_emb.inv_freq.detach().float().cpu().numpy()
    freqs = e.op("Mul", e.op("Unsqueeze", pos, e.i64(1)), e.const(inv_freq, np.float32))
    emb = e.op("Concat", freqs, freqs, axis=-1)
    cos, sin = e.op("Cos", emb), e.op("Sin", emb)
    scaling = float(getattr(m.rotary_emb, "attention_scaling", 1.0))
    if scaling != 1.0:
        cos, sin = e.op("Mul", cos, e.f32(scaling)), e.op("Mul", sin, e.f32(scaling))
    new_rows = (e.i64(n_cache), e.i64(n_cache + t), e.i64(0))
    cos_q, sin_q = e.op("Slice", cos, *new_rows), e.op("Slice", sin, *new_rows)
    valid = e.op("Expand", e.op("Unsqueeze", "cache_valid", e.i64(0)), e.i64(t, n_cache))
    mask = e.op("Concat", valid, e.const(np.tril(np.ones((t, t), dtype=bool))), axis=1)

    h = e.op("Gather", w.add("embed_tokens.weight", m.embed_tokens.weight),
             e.op("Reshape", "input_ids", e.i64(t)), axis=0)  # [T, hidden]
    functions: dict[str, onnx.FunctionProto] = {}
    new_outputs = []
    for i, layer in enumerate(m.layers):
        attn, p = layer.self_attn, f"layers.{i}"
        x = _rmsnorm(e, w, h, layer.input_layernorm, f"{p}.input_layernorm")

        def heads(proj: str, n: int) -> str:  # [T, n*D] -> [1, n, T, D]
            y = _linear(e, w, x, getattr(attn, proj), f"{p}.self_attn.{proj}")
            return e.op("Transpose", e.op("Reshape", y, e.i64(1, t, n, d)), perm=[0, 2, 1, 3])

        q = heads("q_proj", hq)
        # New K/V rounded as the sinks/residual store them (the outputs the runtime writes
        # there, `new.{unit}.`: a split layer's units each get their heads), seen by
        # attention right away.
        res, rg = policy.residual, policy.residual_group(d)
        units = policy.layer_units(i)
        new_kv = []
        for side, proj in (("k", "k_proj"), ("v", "v_proj")):
            x16 = e.op("Cast", heads(proj, hkv), to=F16)
            if len(units) == 1:
                stored = store_new(e, x16, res, rg, d, plain_names(f"new.{units[0]}.{side}", res))
            else:
                stored = store_new(e, x16, res, rg, d, plain_names(f"new.{i}.{side}.all", res))
                for u in units:
                    idx = e.const(np.array(policy.unit_heads(u, hkv), np.int64))
                    for part, out in zip(stored, plain_names(f"new.{u}.{side}", res)):
                        e.op("Gather", part, idx, axis=1, out=out)
            new_kv.append(read_plain(e, stored, res, rg, d))
            for u in units:
                names = plain_names(f"new.{u}.{side}", res)
                hu = len(policy.unit_heads(u, hkv))
                new_outputs += [helper.make_tensor_value_info(n, dt, [1, hu, t, d if n == names[0] else d // rg])
                                for n, dt in zip(names, plain_types(res))]
        if len(units) == 1:
            name = unit_attention(policy, units[0], shape, hq, False, functions)
        else:
            name = split_attention(policy, i, shape, hq, functions)
        cache = [f"past.{u}.{n}" for u in units for n in unit_buffers(policy, u)]
        o = e.op(name, q, *new_kv, cos, sin, cos_q, sin_q, mask, *cache, domain=DOMAIN)
        o = e.op("Reshape", e.op("Transpose", o, perm=[0, 2, 1, 3]), e.i64(t, hq * d))
        h = e.op("Add", h, _linear(e, w, o, attn.o_proj, f"{p}.self_attn.o_proj"))

        x = _rmsnorm(e, w, h, layer.post_attention_layernorm, f"{p}.post_attention_layernorm")
        mlp = layer.mlp
        gate = _linear(e, w, x, mlp.gate_proj, f"{p}.mlp.gate_proj")
        up = _linear(e, w, x, mlp.up_proj, f"{p}.mlp.up_proj")
        act = e.op("Mul", e.op("Mul", gate, e.op("Sigmoid", gate)), up)  # SiLU(gate) * up
        h = e.op("Add", h, _linear(e, w, act, mlp.down_proj, f"{p}.mlp.down_proj"))

    last = e.op("Slice", h, e.i64(t - 1), e.i64(t), e.i64(0))  # only the last token's logits
    x = _rmsnorm(e, w, last, m.norm, "norm")
    logits = _linear(e, w, x, model.lm_head, "lm_head")  # shares embed_tokens.weight when tied
    e.op("Reshape", logits, e.i64(1, 1, -1), out="logits")

    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, t]),
              helper.make_tensor_value_info("new_positions", TensorProto.INT64, [t]),
              helper.make_tensor_value_info("cache_positions", TensorProto.INT64, [n_cache]),
              helper.make_tensor_value_info("cache_valid", TensorProto.BOOL, [n_cache])]
    inputs += [helper.make_tensor_value_info(n, _ONNX_DTYPES[dt], list(s))
               for n, s, dt in cache_inputs(policy, shape, context)]
    outputs = [helper.make_tensor_value_info("logits", F32, [1, 1, cfg.vocab_size])] + new_outputs
    graph = helper.make_graph(e.nodes, "edgekv_decode" if t == 1 else "edgekv_prefill",
                              inputs, outputs, initializer=w.tensors)
    onnx_model = helper.make_model(graph, opset_imports=opset_imports(),
                                   functions=list(functions.values()), producer_name="edgekv")
    onnx_model.ir_version = IR_VERSION
    return onnx_model
