"""Pack kernel (TE): quantize and pack one full residual block, bit exact with
edgekv.quant / edgekv.packing.

Keys [1,H,B,D] -> codes [1,H,D,B*b/8] (per channel over the block), scale/zero [1,H,D].
Values [1,H,B,D] -> codes [1,H,B,D*b/8] (per token in groups of Gv, p.group_v), scale/zero
[1,H,B,D/Gv]. The block is the residual as stored: fp16, or (residual "u8") 8-bit codes
[1,H,B,D] with fp16 scale/zero [1,H,B,D/G] (per head with "u8h"/"u8hr"), dequantized to
fp32 first (and with "u8hr" un-rotated in float64) as the reference cache does.

The recipe is quant.py's, step by step in fp32: scale = fp16((max-min)/(2^b-1)),
zero = fp16(min), code = clip(round_half_even((x - zero)/scale)) with the *stored* fp16
scale and zero (0 where scale is 0). A true division, not a reciprocal multiply, and
nearbyint (half to even) rather than round (half away from zero).
"""

from __future__ import annotations

from tvm import te, tirx

from edgekv.policy import plain_group, plain_names, plain_rotated
from edgekv.tvm_kernels import hadamard_te
from edgekv.tvm_kernels.params import PackParams

F32, F16, U8, F64 = "float32", "float16", "uint8", "float64"


def plain_input(name: str, shape: tuple, group: int, residual: str, unrotate=hadamard_te.dense):
    """Placeholders of a sink/residual buffer [..., D] (CachePolicy.plain_tensors) and a
    loader of its element at an index as fp32: the fp16 value, or with an 8-bit residual
    code * scale + zero of the channel's group (`group`, or the head with "u8h"; "u8hr" then
    un-rotates, `_unrotated`, in the form `unrotate` of edgekv.tvm_kernels.hadamard_te, unless
    it is None). An 8-bit code times an fp16 scale is exact in fp32, so a fused multiply-add
    rounds to the reference's value too."""
    names = plain_names(name, residual)
    if residual == "fp16":
        x = te.placeholder(shape, F16, name=name)
        return [x], lambda *ix: x[ix].astype(F32)
    group = plain_group(residual, group, shape[-1])
    x = te.placeholder(shape, U8, name=name)
    sc, z = (te.placeholder((*shape[:-1], shape[-1] // group), F16, name=n) for n in names[1:])

    def load(*ix):
        at = (*ix[:-1], ix[-1] // group)
        return x[ix].astype(F32) * sc[at].astype(F32) + z[at].astype(F32)
    if plain_rotated(residual) and unrotate is not None:  # None: the caller reads x @ H as stored
        return [x, sc, z], _unrotated(load, shape, name, unrotate)
    return [x, sc, z], load


def _unrotated(load, shape: tuple, name: str, unrotate):
    """Loader of (dequantized) @ H for residual "u8hr", multiplied in float64 and rounded
    to fp32 as the reference cache does (so pack stays bit exact)."""
    x = te.compute(shape, lambda *ix: load(*ix).astype(F64), name=f"{name}_f64")
    y = unrotate(x, shape, lambda *v: v[-1], lambda v, c: (*v[:-1], c), shape[-1], f"{name}_unrot", F64)
    y32 = te.compute(shape, lambda *ix: y[ix].astype(F32), name=f"{name}_unrot32")
    return lambda *ix: y32[ix]


def _codes(x, scale, zero, levels: int):
    s = scale.astype(F32)
    z = zero.astype(F32)
    pos = s > tirx.const(0.0, F32)
    safe = tirx.Select(pos, s, tirx.const(1.0, F32))
    q = tirx.nearbyint((x.astype(F32) - z) / safe)
    q = tirx.Select(pos, q, tirx.const(0.0, F32))
    q = tirx.max(tirx.min(q, tirx.const(float(levels), F32)), tirx.const(0.0, F32))
    return q.astype(U8)


def _pack_stream(code_at, nbytes: int, bits: int, shape_pre: tuple, name: str):
    """Bytes of the little-endian bit stream of `code_at(*pre, i)`: stream bit p is bit
    p % b of code p // b, and byte j holds stream bits [8j, 8j+8)."""
    if bits == 8:
        return te.compute((*shape_pre, nbytes), lambda *ix: code_at(*ix[:-1], ix[-1]), name=name)

    def byte(*ix):
        j = ix[-1]
        acc = tirx.const(0, U8)
        for bit in range(8):
            p = j * 8 + bit
            b = (code_at(*ix[:-1], tirx.floordiv(p, bits)) >> tirx.floormod(p, bits).astype(U8)) & tirx.const(1, U8)
            acc = acc | (b << tirx.const(bit, U8))
        return acc

    return te.compute((*shape_pre, nbytes), byte, name=name)


def pack_keys_te(p: PackParams) -> list[te.Tensor]:
    h, b, d, bits = p.heads, p.block, p.head_dim, p.bits
    levels = (1 << bits) - 1
    inputs, x = plain_input("x", (1, h, b, d), p.group, p.residual)
    t = te.reduce_axis((0, b), name="t")
    mn = te.compute((1, h, d), lambda n, i, c: te.min(x(n, i, t, c), axis=t), name="kmin")
    t2 = te.reduce_axis((0, b), name="t2")
    mx = te.compute((1, h, d), lambda n, i, c: te.max(x(n, i, t2, c), axis=t2), name="kmax")
    scale = te.compute((1, h, d), lambda n, i, c: ((mx[n, i, c] - mn[n, i, c]) / tirx.const(float(levels), F32)).astype(F16), name="scale")
    zero = te.compute((1, h, d), lambda n, i, c: mn[n, i, c].astype(F16), name="zero")
    codes = te.compute((1, h, d, b), lambda n, i, c, tok: _codes(x(n, i, tok, c), scale[n, i, c], zero[n, i, c], levels), name="kcodes")
    packed = _pack_stream(lambda n, i, c, k: codes[n, i, c, k], b * bits // 8, bits, (1, h, d), "codes")
    return [*inputs, packed, scale, zero]


def pack_values_te(p: PackParams) -> list[te.Tensor]:
    h, b, d, g, bits = p.heads, p.block, p.head_dim, p.group_v, p.bits
    levels = (1 << bits) - 1
    ng = d // g
    inputs, x = plain_input("x", (1, h, b, d), p.group, p.residual)  # the residual groups by G
    e = te.reduce_axis((0, g), name="e")
    mn = te.compute((1, h, b, ng), lambda n, i, tok, k: te.min(x(n, i, tok, k * g + e), axis=e), name="vmin")
    e2 = te.reduce_axis((0, g), name="e2")
    mx = te.compute((1, h, b, ng), lambda n, i, tok, k: te.max(x(n, i, tok, k * g + e2), axis=e2), name="vmax")
    scale = te.compute((1, h, b, ng), lambda *ix: ((mx[ix] - mn[ix]) / tirx.const(float(levels), F32)).astype(F16), name="scale")
    zero = te.compute((1, h, b, ng), lambda *ix: mn[ix].astype(F16), name="zero")
    codes = te.compute((1, h, b, d), lambda n, i, tok, c: _codes(
        x(n, i, tok, c), scale[n, i, tok, c // g], zero[n, i, tok, c // g], levels), name="vcodes")
    packed = _pack_stream(lambda n, i, tok, k: codes[n, i, tok, k], d * bits // 8, bits, (1, h, b), "codes")
    return [*inputs, packed, scale, zero]


def pack_func(p: PackParams, side: str):
    """The PrimFunc (x, [x_scale, x_zero,] codes, scale, zero) for 'k' or 'v'."""
    args = pack_keys_te(p) if side == "k" else pack_values_te(p)
    return te.create_prim_func(args).with_attr("global_symbol", f"pack_{side}_{p.key}")
