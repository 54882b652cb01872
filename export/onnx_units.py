"""Attention over a split layer (policy.units: its KV heads in units of different widths).

Each unit is a whole cache over its heads, so the layer's attention is the units' own
CompressedAttention functions side by side: a wrapper function gathers each unit's query
heads (GQA: query head h reads KV head h // n_rep) and new K/V heads, calls the unit's
function on the unit's buffers, and puts the outputs back in head order. The decode graph
keeps one attention node per layer, so backends that cut or replace it per layer
(runtime/graph_split.py, the kernel backend) see a split layer as one node whose cache
inputs are its units' buffers in unit order.
"""

from __future__ import annotations

import numpy as np
from onnx import FunctionProto, helper

from edgekv.export.onnx_attention import attention_function, attention_inputs, attention_name
from edgekv.export.onnx_ops import DOMAIN, Emitter, opset_imports
from edgekv.policy import CachePolicy, KVShape

CALL_INPUTS = 8  # q, k, v, cos_k, sin_k, cos_q, sin_q, mask (attention_inputs)


def unit_attention(policy: CachePolicy, unit: int, shape: KVShape, num_heads: int, split: bool,
                   functions: dict[str, FunctionProto]) -> str:
    """The name of a unit's attention function, added to `functions` if new. `split`: the
    unit is one of several in its layer (the function is sized to the unit's heads)."""
    heads = len(policy.unit_heads(unit, shape.num_kv_heads))
    rep = num_heads // shape.num_kv_heads
    bk, bv, g, gv = policy.bits_k[unit], policy.bits_v[unit], policy.group, policy.value_group(unit)
    rotate = policy.rotation == "hadamard"
    name = attention_name(bk, bv, rotate, policy.meta, policy.residual, None if gv == g else gv,
                          heads if split else None)
    if name not in functions:
        functions[name] = attention_function(bk, bv, num_heads=heads * rep, num_kv_heads=heads,
                                             head_dim=shape.head_dim, block=policy.block, group=g, rotate=rotate,
                                             meta=policy.meta, residual=policy.residual, group_v=gv, unit=split)
    return name


def unit_buffers(policy: CachePolicy, unit: int) -> list[str]:
    """A unit's cache buffer names in its attention function's input order."""
    return attention_inputs(policy.bits_k[unit], policy.bits_v[unit], policy.meta, policy.residual)[CALL_INPUTS:]


def split_attention(policy: CachePolicy, layer: int, shape: KVShape, num_heads: int,
                    functions: dict[str, FunctionProto]) -> str:
    """The wrapper function of a split layer (added to `functions`): inputs as
    CompressedAttention's 8 per-call inputs, then each unit's buffers prefixed `u{j}.`."""
    units, hkv = policy.layer_units(layer), shape.num_kv_heads
    rep = num_heads // hkv
    names = [unit_attention(policy, u, shape, num_heads, True, functions) for u in units]
    heads = [policy.unit_heads(u, hkv) for u in units]
    name = "CompressedAttention_split_" + "__".join(
        "h" + "".join(map(str, hs)) + "_" + n.removeprefix("CompressedAttention_") for hs, n in zip(heads, names))
    if name in functions:
        return name
    e = Emitter()
    outs = []
    for j, (u, hs, fn) in enumerate(zip(units, heads, names)):
        kv = e.const(np.array(hs, np.int64))
        qh = e.const(np.array([h * rep + r for h in hs for r in range(rep)], np.int64))
        call = [e.op("Gather", "q", qh, axis=1), e.op("Gather", "k", kv, axis=1), e.op("Gather", "v", kv, axis=1),
                *attention_inputs(16, 16)[3:CALL_INPUTS]]
        outs.append(e.op(fn, *call, *(f"u{j}.{b}" for b in unit_buffers(policy, u)), domain=DOMAIN))
    order = [h * rep + r for hs in heads for h in hs for r in range(rep)]
    e.op("Gather", e.op("Concat", *outs, axis=1), e.const(np.argsort(order).astype(np.int64)), axis=1, out="o")
    inputs = attention_inputs(16, 16)[:CALL_INPUTS] + [f"u{j}.{b}" for j, u in enumerate(units)
                                                       for b in unit_buffers(policy, u)]
    functions[name] = helper.make_function(DOMAIN, name, inputs, ["o"], e.nodes,
                                           opset_imports())
    return name
