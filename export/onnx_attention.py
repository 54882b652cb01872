"""CompressedAttention: attention over one layer's compressed cache as an ONNX function
in the `edgekv` domain (standard ops only; a backend may match the name and substitute a
kernel, as runtime/kernel_backend.py does). Numerics follow edgekv.reference exactly."""

from __future__ import annotations

import math

import numpy as np
from onnx import FunctionProto, helper

from edgekv.export.onnx_ops import (
    DOMAIN, F32, OPSET, Emitter, _decode_u8, _hadamard, _suffix, unpack_last, unpack_rows,
)
from edgekv.export.onnx_plain import read_plain
from edgekv.meta_u8 import is_u8
from edgekv.policy import layer_buffer_names, plain_group, plain_names, plain_rotated, residual_suffix

PLAIN = ("sink_k", "sink_v", "residual_k", "residual_v")


def attention_inputs(bits_k: int, bits_v: int, meta: str = "fp16", residual: str = "fp16") -> list[str]:
    """The function's inputs: 8 per call, then the layer's cache buffers in
    CachePolicy.layer_tensors order."""
    return (["q", "k", "v", "cos_k", "sin_k", "cos_q", "sin_q", "mask"]
            + layer_buffer_names(bits_k, bits_v, meta, residual))


def attention_name(bits_k: int, bits_v: int, rotate: bool = False, meta: str = "fp16",
                   residual: str = "fp16", group_v: int | None = None, heads: int | None = None) -> str:
    """rotate: the policy rotates quantized blocks (a 16/16 layer has none to un-rotate);
    group_v: the ring values' group where it is not the sinks/residual group (functions are
    shared by the layers of one name, so the name must tell value groups apart); heads: the
    KV heads of a unit of a split layer (policy.units; None: the model's)."""
    quantized = bits_k != 16 or bits_v != 16
    res = residual_suffix(residual)
    gv = f"_gv{group_v}" if group_v is not None and bits_v != 16 else ""
    return (f"CompressedAttention_k{bits_k}_v{bits_v}{gv}"
            f"{_suffix(rotate and quantized, meta if quantized else 'fp16')}{res}"
            + ("" if heads is None else f"_h{heads}"))


def _rope(e: Emitter, x: str, cos: str, sin: str) -> str:
    """x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1) (the HF convention)."""
    x1, x2 = e.op("Split", x, axis=-1, num_outputs=2, n_out=2)
    rot = e.op("Concat", e.op("Neg", x2), x1, axis=-1)
    return e.op("Add", e.op("Mul", x, cos), e.op("Mul", rot, sin))


def _ring_keys(e: Emitter, bits: int, head_dim: int, meta: str = "fp16") -> str:
    """Ring keys in slot order, fp32 [1,H,W,D] (pre-RoPE)."""
    if bits == 16:
        return e.op("Reshape", e.op("Cast", "ring_k", to=F32), e.i64(0, 0, -1, head_dim))
    codes = unpack_rows(e, "ring_k_codes", bits)
    axis = e.i64(-2)
    if is_u8(meta):  # scale/zero codes [1,H,nblk,D], meta [1,H,nblk,3] ([1,1,nblk,3] with u8s)
        scale, zero = _decode_u8(e, "ring_k_scale", "ring_k_zero", "ring_k_meta")
    else:
        scale, zero = e.op("Cast", "ring_k_scale", to=F32), e.op("Cast", "ring_k_zero", to=F32)
    scale, zero = e.op("Unsqueeze", scale, axis), e.op("Unsqueeze", zero, axis)
    x = e.op("Add", e.op("Mul", codes, scale), zero)  # [1,H,nblk,B,D]
    return e.op("Reshape", x, e.i64(0, 0, -1, head_dim))


def _ring_values(e: Emitter, bits: int, head_dim: int, group: int, block: int = 0, meta: str = "fp16") -> str:
    """Ring values in slot order, fp32 [1,H,W,D]."""
    if bits == 16:
        return e.op("Cast", "ring_v", to=F32)
    codes = unpack_last(e, "ring_v_codes", bits)
    codes = e.op("Reshape", codes, e.i64(0, 0, 0, head_dim // group, group))
    axis = e.i64(-1)
    if is_u8(meta):  # codes per token [1,H,W,D/G]; meta per block [1,H or 1,nblk,3]
        per_block = e.i64(0, 0, -1, block, head_dim // group)
        scale, zero = _decode_u8(e, e.op("Reshape", "ring_v_scale", per_block),
                                 e.op("Reshape", "ring_v_zero", per_block),
                                 e.op("Unsqueeze", "ring_v_meta", e.i64(3)))
        per_token = e.i64(0, 0, -1, head_dim // group)
        scale, zero = e.op("Reshape", scale, per_token), e.op("Reshape", zero, per_token)
    else:
        scale, zero = e.op("Cast", "ring_v_scale", to=F32), e.op("Cast", "ring_v_zero", to=F32)
    scale, zero = e.op("Unsqueeze", scale, axis), e.op("Unsqueeze", zero, axis)
    x = e.op("Add", e.op("Mul", codes, scale), zero)
    return e.op("Reshape", x, e.i64(0, 0, 0, head_dim))


def attention_function(bits_k: int, bits_v: int, *, num_heads: int, num_kv_heads: int,
                       head_dim: int, block: int, group: int, rotate: bool = False,
                       meta: str = "fp16", residual: str = "fp16", group_v: int | None = None,
                       unit: bool = False) -> FunctionProto:
    """CompressedAttention_k{bk}_v{bv} (attention_name).

    Inputs: q [1,Hq,T,D] fp32 pre-RoPE; k, v [1,Hkv,T,D] fp32 (already rounded as the
    residual stores them); cos_k/sin_k [L+T,D] for every cache slot then the new tokens;
    cos_q/sin_q [T,D]; mask bool [T,L+T]; the layer's cache buffers (sinks/residual in fp16
    or 8-bit per `residual` (export.onnx_plain) with `group` or per head, ring as stored, ring values
    grouped by `group_v` (None: `group`)).
    Output: o [1,Hq,T,D] fp32. `unit`: the function serves a unit of a split layer (its
    name then says num_kv_heads, export.onnx_units). Cache slots are attended in storage order; positions and
    the mask make the order irrelevant, so nothing is gathered or reordered.

    rotate (quantized sides only): ring keys are un-rotated before RoPE (one D x D MatMul
    over the ring: RoPE does not commute with the rotation); values are not -- the few
    fp16 sink/residual/new values are rotated instead and the output un-rotated once,
    since P @ (V H) = (P @ V) H ("u8hr" sink/residual values are stored rotated already).
    """
    e = Emitter()
    n_rep = num_heads // num_kv_heads
    rot_k, rot_v = rotate and bits_k != 16, rotate and bits_v != 16
    h = _hadamard(e, head_dim) if rot_k or rot_v else None
    ring_k = _ring_keys(e, bits_k, head_dim, meta)
    if rot_k:
        ring_k = e.op("MatMul", ring_k, h)
    rg = plain_group(residual, group, head_dim)
    # "u8hr" sink/residual values are stored rotated: with rotated ring values they join the
    # output's one un-rotation as they are, instead of an un-rotation and a rotation each
    # (keys cannot: RoPE follows them)
    fold = rot_v and plain_rotated(residual)
    plain = {name: read_plain(e, plain_names(name, residual), residual, rg, head_dim,
                              keep_rotated=fold and name.endswith("_v")) for name in PLAIN}
    keys = e.op("Concat", plain["sink_k"], ring_k, plain["residual_k"], "k", axis=2)
    fp_vals = [plain["sink_v"], plain["residual_v"], "v"]
    if rot_v:
        fp_vals = [x if fold and x != "v" else e.op("MatMul", x, h) for x in fp_vals]
    ring_v = _ring_values(e, bits_v, head_dim, group if group_v is None else group_v, block, meta)
    vals = e.op("Concat", fp_vals[0], ring_v, *fp_vals[1:], axis=2)
    keys = _rope(e, keys, "cos_k", "sin_k")
    q = e.op("Mul", _rope(e, "q", "cos_q", "sin_q"), e.f32(1.0 / math.sqrt(head_dim)))
    # GQA: query head h reads KV head h // n_rep, so [1,Hq,T,D] -> [1,Hkv,n_rep,T,D] and
    # K/V get a broadcast axis instead of being repeated.
    q = e.op("Reshape", q, e.i64(1, num_kv_heads, n_rep, -1, head_dim))
    kt = e.op("Unsqueeze", e.op("Transpose", keys, perm=[0, 1, 3, 2]), e.i64(2))
    scores = e.op("MatMul", q, kt)  # [1,Hkv,n_rep,T,L+T]
    scores = e.op("Where", "mask", scores, e.f32(-np.inf))
    probs = e.op("Softmax", scores, axis=-1)
    o = e.op("MatMul", probs, e.op("Unsqueeze", vals, e.i64(2)))  # [1,Hkv,n_rep,T,D]
    if rot_v:
        o = e.op("MatMul", o, h)
    e.op("Reshape", o, e.i64(1, num_heads, -1, head_dim), out="o")
    name = attention_name(bits_k, bits_v, rotate, meta, residual, None if group_v == group else group_v,
                          num_kv_heads if unit else None)
    return helper.make_function(DOMAIN, name,
                                attention_inputs(bits_k, bits_v, meta, residual), ["o"], e.nodes,
                                [helper.make_opsetid("", OPSET)])
