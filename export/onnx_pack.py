"""pack.onnx: quantize and pack one full residual block (DESIGN.md "Graphs").

The runtime runs it when a layer's residual fills, then writes the outputs for that
layer's code widths into ring slot `blocks_pushed % ring_slots`. One graph serves every
layer: it returns the packing for each distinct code width the policy uses (for values,
each distinct width and value group, policy.groups_v; policy.packed_prefix
names them).
Bit-exact with edgekv.quant (tests/test_onnx_export.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekv.export.onnx_ops import (
    DOMAIN, F16, U8, Emitter, opset_imports, quantize_keys_function, quantize_values_function,
)
from edgekv.export.onnx_plain import plain_types, read_plain
from edgekv.meta_u8 import is_u8, meta_heads
from edgekv.policy import META_FIELDS, CachePolicy, KVShape, packed_prefix, plain_names, quantized_parts

IR_VERSION = 9  # what onnxruntime >= 1.15 reads; nothing here needs more


def pack_outputs(policy: CachePolicy) -> tuple[list[int], list[tuple[int, int]]]:
    """Code widths (< 16) pack.onnx produces for keys, and (width, value group) for values."""
    return (sorted({b for b in policy.bits_k if b < 16}),
            sorted({(b, policy.value_group(i)) for i, b in enumerate(policy.bits_v) if b < 16}))


def build_pack(policy: CachePolicy, shape: KVShape) -> onnx.ModelProto:
    """Inputs k, v: the layer's full residual as stored, fp16 [1,H,B,D] or with residual
    "u8" codes k, v uint8 [1,H,B,D] and k_scale, k_zero, v_scale, v_zero fp16 [1,H,B,D/G]
    (export.onnx_plain; dequantized first) (and f fp32 [H,D,D], the layer's key feedback step
    matrices, when policy.key_feedback is set; and the layer's own variant where a side has
    several, `pack_selectors`: k_bits, v_bits, v_group int64 [1]: only that variant's outputs
    are computed, the others are zeros); outputs k{b}_codes [1,H,D,B*b/8], k{b}_scale/zero [1,H,D]
    and v{b}_codes [1,H,B,D*b/8], v{b}_scale/zero [1,H,B,D/Gv] for each width b used, with
    each value group Gv a layer quantizes with (named v{b}g{Gv}_... where Gv is not G)
    (of the Hadamard-rotated block when policy.rotation says so)."""
    policy.check_shape(shape)
    h, d, blk = shape.num_kv_heads, shape.head_dim, policy.block
    hm = meta_heads(policy.meta, h)
    kbits, vouts = pack_outputs(policy)
    e = Emitter()
    outputs, functions = [], []
    rotate_dim = d if policy.rotation == "hadamard" else 0
    feedback_dim = d if policy.key_feedback is not None and kbits else 0
    # One graph serves every layer, but a layer reads only its own key width and value
    # (width, group): computing the others costs 2-3x (feedback rounding is ~3x the work of
    # nearest, a calibrated layout has 5+ value variants), so each runs under an If on the
    # layer's selectors and the outputs it skips are zeros the runtime never reads.
    selectors = pack_selectors(policy)
    res = policy.residual
    rg = policy.residual_group(d)
    x = {side: read_plain(e, plain_names(side, res), res, rg, d) for side in "kv"}  # fp32 [1,H,B,D]
    # keys have no group (None); the residual inputs are grouped by rg, values by their own Gv
    for side, widths in (("k", [(b, None) for b in kbits]), ("v", vouts)):
        for b, gv in widths:
            if side == "k":
                fn = quantize_keys_function(b, rotate_dim, policy.meta, policy.clip_ratio(side, b), feedback_dim)
                shapes = ([1, h, d, blk * b // 8], [1, h, d], [1, h, d], [1, hm, META_FIELDS])
            else:
                fn = quantize_values_function(b, gv, rotate_dim, policy.meta, policy.clip_ratio(side, b))
                shapes = ([1, h, blk, d * b // 8], [1, h, blk, d // gv], [1, h, blk, d // gv], [1, hm, META_FIELDS])
            functions.append(fn)
            parts = quantized_parts(policy.meta)
            names = [f"{packed_prefix(policy, side, b, gv)}_{part}" for part in parts]
            md = U8 if is_u8(policy.meta) else F16
            infos = [helper.make_tensor_value_info(n, t, s) for n, t, s in zip(names, (U8, md, md, F16), shapes)]
            args = [x[side], "f"] if side == "k" and feedback_dim else [x[side]]
            chosen = {f"{side}_bits": b, "v_group": gv}
            tests = [(n, chosen[n]) for n in selectors if n.startswith(side)]
            if tests:
                _gated_call(e, fn.name, args, infos, tests, f"{side}{b}" + (f"g{gv}" if gv else ""))
            else:
                e.op(fn.name, *args, out=names, domain=DOMAIN)
            outputs += infos
    if not outputs:  # an all-16-bit policy still gets a valid (pass-through) graph
        e.op("Cast", x["k"], to=F16, out="k16")
        e.op("Cast", x["v"], to=F16, out="v16")
        outputs = [helper.make_tensor_value_info(n, F16, [1, h, blk, d]) for n in ("k16", "v16")]
    inputs = [helper.make_tensor_value_info(n, dt, [1, h, blk, d if n == side else d // rg])
              for side in "kv" for n, dt in zip(plain_names(side, res), plain_types(res))]
    if feedback_dim:  # the layer's key feedback step matrices (edgekv.key_feedback), bound per layer
        inputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [h, d, d]))
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, [1]) for n in selectors]
    graph = helper.make_graph(e.nodes, "edgekv_pack", inputs, outputs)
    model = helper.make_model(graph, opset_imports=opset_imports(), functions=functions,
                              producer_name="edgekv")
    model.ir_version = IR_VERSION
    return model


def pack_selectors(policy: CachePolicy) -> list[str]:
    """The int64 [1] inputs that name a layer's own variant (CachePolicy.pack_variant, bound
    per layer by runtime.cache_state): k_bits when keys use several widths, v_bits /
    v_group when values use several widths / groups."""
    kbits, vouts = pack_outputs(policy)
    return [n for n, several in (("k_bits", len(kbits) > 1), ("v_bits", len({b for b, _ in vouts}) > 1),
                                 ("v_group", len({g for _, g in vouts}) > 1)) if several]


def _gated_call(e: Emitter, fn: str, args: list[str], infos: list, tests: list[tuple[str, int]],
                tag: str) -> None:
    """outputs = fn(*args) if every selector input equals its value in `tests`, else zeros
    of the same shapes (an If node)."""
    then, other = Emitter(f"then{tag}_"), Emitter(f"else{tag}_")
    then.op(fn, *args, out=[f"then{tag}_{i.name}" for i in infos], domain=DOMAIN)
    for i in infos:
        t = i.type.tensor_type
        dims = [x.dim_value for x in t.shape.dim]
        zeros = np.zeros(dims, helper.tensor_dtype_to_np_dtype(t.elem_type))
        other.op("Constant", out=f"else{tag}_{i.name}", value=numpy_helper.from_array(zeros))

    def branch(em: Emitter, prefix: str):
        outs = [helper.make_tensor_value_info(f"{prefix}{i.name}", i.type.tensor_type.elem_type, None)
                for i in infos]
        return helper.make_graph(em.nodes, prefix.rstrip("_"), [], outs)

    conds = [e.op("Equal", name, e.const([value], np.int64)) for name, value in tests]
    cond = conds[0] if len(conds) == 1 else e.op("And", *conds)
    e.op("If", cond, out=[i.name for i in infos], then_branch=branch(then, f"then{tag}_"),
         else_branch=branch(other, f"else{tag}_"))
