"""pack.onnx: quantize and pack one full residual block (DESIGN.md "Graphs").

The runtime runs it when a layer's residual fills, then writes the outputs for that
layer's code widths into ring slot `blocks_pushed % ring_slots`. One graph serves every
layer: it returns the packing for each distinct code width the policy uses.
Bit-exact with edgekv.quant (tests/test_onnx_export.py).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from edgekv.export.onnx_ops import (
    DOMAIN, F16, U8, Emitter, opset_imports, quantize_keys_function, quantize_values_function,
)
from edgekv.policy import META_FIELDS, CachePolicy, KVShape, quantized_parts

IR_VERSION = 9  # what onnxruntime >= 1.15 reads; nothing here needs more


def pack_outputs(policy: CachePolicy) -> tuple[list[int], list[int]]:
    """Code widths (< 16) pack.onnx produces for keys and for values."""
    return (sorted({b for b in policy.bits_k if b < 16}), sorted({b for b in policy.bits_v if b < 16}))


def build_pack(policy: CachePolicy, shape: KVShape) -> onnx.ModelProto:
    """Inputs k, v fp16 [1,H,B,D] (and f fp32 [H,D,D], the layer's key feedback step
    matrices, when policy.key_feedback is set); outputs k{b}_codes [1,H,D,B*b/8], k{b}_scale/zero [1,H,D]
    and v{b}_codes [1,H,B,D*b/8], v{b}_scale/zero [1,H,B,D/G] for each width b used
    (of the Hadamard-rotated block when policy.rotation says so)."""
    policy.check_shape(shape)
    h, d, blk, g = shape.num_kv_heads, shape.head_dim, policy.block, policy.group
    kbits, vbits = pack_outputs(policy)
    e = Emitter()
    outputs, functions = [], []
    rotate_dim = d if policy.rotation == "hadamard" else 0
    feedback_dim = d if policy.key_feedback is not None and kbits else 0
    for side, widths in (("k", kbits), ("v", vbits)):
        for b in widths:
            if side == "k":
                fn = quantize_keys_function(b, rotate_dim, policy.meta, policy.clip_ratio(side, b), feedback_dim)
                shapes = ([1, h, d, blk * b // 8], [1, h, d], [1, h, d], [1, h, META_FIELDS])
            else:
                fn = quantize_values_function(b, g, rotate_dim, policy.meta, policy.clip_ratio(side, b))
                shapes = ([1, h, blk, d * b // 8], [1, h, blk, d // g], [1, h, blk, d // g], [1, h, META_FIELDS])
            functions.append(fn)
            parts = quantized_parts(policy.meta)
            names = [f"{side}{b}_{part}" for part in parts]
            e.op(fn.name, *([side, "f"] if side == "k" and feedback_dim else [side]), out=names, domain=DOMAIN)
            md = U8 if policy.meta == "u8" else F16
            outputs += [helper.make_tensor_value_info(n, t, s)
                        for n, t, s in zip(names, (U8, md, md, F16), shapes)]
    if not outputs:  # an all-16-bit policy still gets a valid (pass-through) graph
        e.op("Identity", "k", out="k16")
        e.op("Identity", "v", out="v16")
        outputs = [helper.make_tensor_value_info(n, F16, [1, h, blk, d]) for n in ("k16", "v16")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1, h, blk, d]) for n in ("k", "v")]
    if feedback_dim:  # the layer's key feedback step matrices (edgekv.key_feedback), bound per layer
        inputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [h, d, d]))
    graph = helper.make_graph(e.nodes, "edgekv_pack", inputs, outputs)
    model = helper.make_model(graph, opset_imports=opset_imports(), functions=functions,
                              producer_name="edgekv")
    model.ir_version = IR_VERSION
    return model
