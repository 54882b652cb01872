"""Compressed-cache operators as ONNX functions in the `edgekv` domain (DESIGN.md "Graphs"):
packing, unpacking and quantization here; the attention over a layer's cache in
export/onnx_attention.py, the sinks/residual formats in export/onnx_plain.py.

Each function body is made of standard ONNX ops (opset 18), so any runtime inlines and
runs it as is; a faster backend may match the function name and substitute a kernel.
Bodies are specialised per model (heads, head_dim, block, group are baked constants)
and per code width, which keeps them free of Shape arithmetic.

Numerics follow edgekv.quant / edgekv.reference exactly: dequant = code*scale + zero in
fp32, quantize with the fp16-rounded scale/zero, Round (half to even), then Clip.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import FunctionProto, NodeProto, TensorProto, helper, numpy_helper

from edgekv.clipping import shrink
from edgekv.meta_u8 import head_axis, is_u8, meta_axes, meta_suffix
from edgekv.policy import quantized_parts

DOMAIN = "edgekv"
DOMAIN_VERSION = 1
OPSET = 18  # Split(num_outputs) needs 18
F32, F16, U8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.UINT8


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


class Emitter:
    """Collects nodes for a graph or function body; every value gets a fresh name and
    identical constants are emitted once."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[NodeProto] = []
        self.prefix = prefix
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, out: str | list[str] | None = None, n_out: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        if out is None:
            outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type),
                                           domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("Constant"),
                                               value=numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))


# ---- bit packing (little-endian bit stream along the last axis, edgekv.packing) -------
# Unpacking is fp32 arithmetic, exact because every value is an integer below 2**24. Eight
# codes fill `bits` bytes; code i starts at bit o = i*bits % 8 of byte s = i*bits // 8 and
# ends within byte s+1 (o + bits <= 15), so with w = byte_s + 256 * byte_s+1
#     code_i = floor(w / 2**o) - 2**bits * floor(w / 2**(o + bits)).
# One MatMul forms both quotients of all 8 codes, a Floor rounds them, a second MatMul takes
# the differences. MatMul/Floor/Cast/Reshape have kernels in every onnxruntime execution
# provider; BitShift and Bitwise* have none in CUDA's (export/cuda_coverage.py checks).
def _unpack_matrices(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(quotients [bits, 16], differences [16, 8]) for 8 codes in `bits` bytes."""
    quot = np.zeros((bits, 16), np.float32)
    for i in range(8):
        s, o = divmod(i * bits, 8)
        for col, shift in ((i, o), (8 + i, o + bits)):
            quot[s, col] = 2.0 ** -shift
            if o + bits > 8:  # the code runs into the next byte
                quot[s + 1, col] = 2.0 ** (8 - shift)
    diff = np.concatenate([np.eye(8), -(2.0 ** bits) * np.eye(8)]).astype(np.float32)
    return quot, diff


def unpack(e: Emitter, packed: str, bits: int, rank: int) -> str:
    """Packed uint8 [..., n*bits/8] (known rank) -> fp32 codes [..., n]."""
    if bits == 8:
        return e.op("Cast", packed, to=F32)
    keep = [0] * (rank - 1)
    quot, diff = _unpack_matrices(bits)
    groups = e.op("Cast", e.op("Reshape", packed, e.i64(*keep, -1, bits)), to=F32)  # [..., units, bits]
    whole = e.op("Floor", e.op("MatMul", groups, e.const(quot)))  # [..., units, 16]
    return e.op("Reshape", e.op("MatMul", whole, e.const(diff)), e.i64(*keep, -1))


def unpack_rows(e: Emitter, packed: str, bits: int) -> str:
    """Key codes [1,H,nblk,D,B*bits/8] -> fp32 [1,H,nblk,B,D]: each channel's B tokens
    are unpacked along the last axis as one long GEMM, then tokens and channels swap."""
    return e.op("Transpose", unpack(e, packed, bits, rank=5), perm=[0, 1, 2, 4, 3])


def unpack_last(e: Emitter, packed: str, bits: int) -> str:
    """Value codes [1,H,W,n*bits/8] -> fp32 [1,H,W,n]."""
    return unpack(e, packed, bits, rank=4)


def pack(e: Emitter, codes: str, bits: int, rank: int) -> str:
    """uint8 codes [..., n] (n % 8 == 0, known rank) -> packed uint8 [..., n*bits/8].
    Eight codes fill `bits` bytes: sum code_i * 2**(i*bits) in int64 (bits never overlap,
    so the sum is an OR), then byte j = word // 256**j % 256 (int64 Div and Mod, which
    CUDA has kernels for, unlike BitShift)."""
    if bits == 8:
        return codes
    keep = [0] * (rank - 1)
    groups = e.op("Reshape", codes, e.i64(*keep, -1, 8))
    weights = e.const(1 << (np.arange(8) * bits), np.int64)
    word = e.op("ReduceSum", e.op("Mul", e.op("Cast", groups, to=TensorProto.INT64), weights),
                e.i64(-1), keepdims=1)
    byte = e.op("Mod", e.op("Div", word, e.const(256 ** np.arange(bits), np.int64)), e.const(256, np.int64))
    return e.op("Reshape", e.op("Cast", byte, to=TensorProto.UINT8), e.i64(*keep, -1))


# ---- quantization (edgekv.quant) --------------------------------------------------------
def _to_f16_f32(e: Emitter, x: str) -> str:
    return e.op("Cast", e.op("Cast", x, to=F16), to=F32)


def _encode_u8(e: Emitter, mn: str, mx: str, bits: int, axes: tuple[int, ...]) -> tuple[str, str, str, str, str]:
    """edgekv.meta_u8.encode, op for op: (scale codes u8, zero codes u8, meta fp16 [1,H,3],
    decoded scale fp32, decoded zero fp32)."""
    ax = e.i64(*axes)
    lo = _to_f16_f32(e, e.op("ReduceMin", mn, ax, keepdims=1))
    dz = _to_f16_f32(e, e.op("Div", e.op("Sub", e.op("ReduceMax", mn, ax, keepdims=1), lo), e.f32(255.0)))
    pos = e.op("Greater", dz, e.f32(0.0))
    zc = e.op("Floor", e.op("Div", e.op("Sub", mn, lo), e.op("Where", pos, dz, e.f32(1.0))))
    zc = e.op("Clip", e.op("Where", pos, zc, e.f32(0.0)), e.f32(0.0), e.f32(255.0))
    zero = e.op("Add", lo, e.op("Mul", zc, dz))
    need = e.op("Div", e.op("Sub", mx, zero), e.f32(float((1 << bits) - 1)))
    top = _to_f16_f32(e, e.op("Mul", e.op("ReduceMax", need, ax, keepdims=1), e.f32(1 + 2**-10)))
    last = e.i64(-1)
    reach = e.op("GreaterOrEqual", e.op("Mul", e.op("Unsqueeze", top, last), _scale_table(e)),
                 e.op("Unsqueeze", need, last))
    sc = e.op("Sub", e.op("ReduceSum", e.op("Cast", reach, to=F32), last, keepdims=0), e.f32(1.0))
    sc = e.op("Clip", sc, e.f32(0.0), e.f32(255.0))
    scale = e.op("Mul", top, e.op("Gather", _scale_table(e), e.op("Cast", sc, to=TensorProto.INT64), axis=0))
    meta = e.op("Concat", *(e.op("Reshape", t, e.i64(0, 0, 1)) for t in (lo, dz, top)), axis=-1)
    return e.op("Cast", sc, to=U8), e.op("Cast", zc, to=U8), e.op("Cast", meta, to=F16), scale, zero


def _decode_u8(e: Emitter, scale_code: str, zero_code: str, meta: str) -> tuple[str, str]:
    """edgekv.meta_u8.decode: codes [..., n] u8 and meta [..., 3] fp16 of the same block
    -> (scale, zero) fp32 [..., n]."""
    m = e.op("Cast", meta, to=F32)
    lo, dz, top = (e.op("Slice", m, e.i64(i), e.i64(i + 1), e.i64(-1)) for i in range(3))
    zero = e.op("Add", lo, e.op("Mul", e.op("Cast", zero_code, to=F32), dz))
    scale = e.op("Mul", top, e.op("Gather", _scale_table(e), e.op("Cast", scale_code, to=TensorProto.INT64), axis=0))
    return scale, zero


def _scale_table(e: Emitter) -> str:
    from edgekv.meta_u8 import SCALE_TABLE

    return e.const(SCALE_TABLE, np.float32)


def _quantize(e: Emitter, x: str, axis: int, bits: int, meta: str = "fp16",
              super_axes: tuple[int, ...] = (), clip: float = 1.0) -> tuple[str, ...]:
    """fp32 x -> (codes uint8 like x, scale, zero reduced over `axis`): fp16, or with meta
    "u8" uint8 codes plus the block's meta [1,H,3] (its groups span `super_axes` of the
    reduced shape). `clip` < 1 narrows each group's range (edgekv.clipping, op for op)."""
    stored, s, z = _grid(e, x, axis, bits, meta, super_axes, clip)
    return (e.op("Cast", _codes(e, x, s, z, bits), to=U8), *stored)


def _grid(e: Emitter, x: str, axis: int, bits: int, meta: str, super_axes: tuple[int, ...],
          clip: float) -> tuple[tuple[str, ...], str, str]:
    """(what is stored: scale, zero[, meta]; scale and zero fp32 unsqueezed at `axis`)."""
    levels = float((1 << bits) - 1)
    ax = e.i64(axis)
    mn = e.op("ReduceMin", x, ax, keepdims=0)
    mx = e.op("ReduceMax", x, ax, keepdims=0)
    if clip != 1.0:
        t = e.op("Mul", e.op("Sub", mx, mn), e.f32(shrink(clip)))
        mn, mx = e.op("Add", mn, t), e.op("Sub", mx, t)
    if is_u8(meta):  # "u8s": one meta for all KV heads, the axis before the block's groups
        span = meta_axes(super_axes, head_axis(meta, super_axes))
        scale, zero, block_meta, s32, z32 = _encode_u8(e, mn, mx, bits, span)
        stored = (scale, zero, block_meta)
    else:
        scale = e.op("Cast", e.op("Div", e.op("Sub", mx, mn), e.f32(levels)), to=F16)
        zero = e.op("Cast", mn, to=F16)
        s32, z32 = e.op("Cast", scale, to=F32), e.op("Cast", zero, to=F32)
        stored = (scale, zero)
    return stored, e.op("Unsqueeze", s32, ax), e.op("Unsqueeze", z32, ax)


def _codes(e: Emitter, x: str, s: str, z: str, bits: int) -> str:
    """Nearest codes (fp32) of x on the grid s, z; 0 where the scale is 0 (edgekv.quant)."""
    nonzero = e.op("Greater", s, e.f32(0.0))
    safe = e.op("Where", nonzero, s, e.f32(1.0))
    q = e.op("Round", e.op("Div", e.op("Sub", x, z), safe))  # division, as the reference does
    q = e.op("Where", nonzero, q, e.f32(0.0))
    return e.op("Clip", q, e.f32(0.0), e.f32(float((1 << bits) - 1)))


def _feedback_codes(e: Emitter, x: str, s: str, z: str, f: str, bits: int, head_dim: int) -> str:
    """edgekv.key_feedback.round_with_feedback, op for op: keys x [1,H,B,D] fp32, grid s, z
    [1,H,1,D], step matrices f [H,D,D]; STEP channels per step, each step's error fed
    forward through its rows of f (one small MatMul). Codes fp32 [1,H,B,D]."""
    from edgekv.key_feedback import STEP

    steps = []
    three = e.i64(3)
    for a in range(0, head_dim, STEP):
        b = a + STEP
        cols = (e.i64(a), e.i64(b), three)
        sa, za = e.op("Slice", s, *cols), e.op("Slice", z, *cols)
        xa = e.op("Slice", x, *cols)
        q = _codes(e, xa, sa, za, bits)
        if b < head_dim:
            err = e.op("Sub", xa, e.op("Add", e.op("Mul", q, sa), za))
            rows = e.op("Slice", f, e.i64(a), e.i64(b), e.i64(1))  # [H, STEP, D]
            x = e.op("Sub", x, e.op("MatMul", err, rows))
        steps.append(q)
    return e.op("Concat", *steps, axis=3)


def _hadamard(e: Emitter, head_dim: int) -> str:
    """The orthonormal Hadamard matrix as a constant (symmetric: it is its own transpose)."""
    from edgekv.rotation import hadamard

    return e.const(hadamard(head_dim), np.float32)


def _suffix(rotate: bool, meta: str = "fp16", clip: float = 1.0, feedback: bool = False) -> str:
    clipped = "" if clip == 1.0 else "_c" + f"{clip:g}".replace(".", "p")
    return ("_rot" if rotate else "") + meta_suffix(meta) + clipped + ("_fb" if feedback else "")


def _outputs(e: Emitter, names: tuple[str, ...], values: tuple[str, ...]) -> None:
    for n, v in zip(names, values):
        e.op("Identity", v, out=n)


def quantize_keys_function(bits: int, rotate_dim: int = 0, meta: str = "fp16", clip: float = 1.0,
                           feedback_dim: int = 0) -> FunctionProto:
    """QuantizeKeys_b{bits}[_rot][_m8][_c{clip}][_fb]: x fp16 [1,H,B,D] -> codes
    [1,H,D,B*bits/8], scale/zero [1,H,D] (fp16, or uint8 codes and meta [1,H,3] with meta
    "u8"). rotate_dim = D: rotate x by the Hadamard matrix first (policy.rotation); clip:
    policy.clip_ratio("k", bits); feedback_dim = D: a second input f [H,D,D], the layer's
    step matrices (policy.key_feedback), rounds query-aware instead of to nearest."""
    e = Emitter()
    x = e.op("Cast", "x", to=F32)
    if rotate_dim:
        x = e.op("MatMul", x, _hadamard(e, rotate_dim))
    stored, s, z = _grid(e, x, 2, bits, meta, (-1,), clip)
    q = _feedback_codes(e, x, s, z, "f", bits, feedback_dim) if feedback_dim else _codes(e, x, s, z, bits)
    codes = pack(e, e.op("Transpose", e.op("Cast", q, to=U8), perm=[0, 1, 3, 2]), bits, rank=4)
    parts = quantized_parts(meta)
    _outputs(e, parts, (codes, *stored))
    name = f"QuantizeKeys_b{bits}{_suffix(bool(rotate_dim), meta, clip, bool(feedback_dim))}"
    return helper.make_function(DOMAIN, name, ["x", "f"] if feedback_dim else ["x"],
                                list(parts), e.nodes, [helper.make_opsetid("", OPSET)])


def quantize_values_function(bits: int, group: int, rotate_dim: int = 0, meta: str = "fp16",
                             clip: float = 1.0) -> FunctionProto:
    """QuantizeValues_b{bits}_g{group}[_rot][_m8][_c{clip}]: x fp16 [1,H,T,D] -> codes
    [1,H,T,D*bits/8], scale/zero [1,H,T,D/G] (with meta "u8": uint8 codes, and the T tokens
    are one block whose meta is [1,H,3])."""
    e = Emitter()
    x = e.op("Cast", "x", to=F32)
    if rotate_dim:
        x = e.op("MatMul", x, _hadamard(e, rotate_dim))
    x = e.op("Reshape", x, e.i64(0, 0, 0, -1, group))
    codes, *stored = _quantize(e, x, 4, bits, meta, (2, 3), clip)
    codes = pack(e, e.op("Reshape", codes, e.i64(0, 0, 0, -1)), bits, rank=4)
    parts = quantized_parts(meta)
    _outputs(e, parts, (codes, *stored))
    return helper.make_function(DOMAIN, f"QuantizeValues_b{bits}_g{group}{_suffix(bool(rotate_dim), meta, clip)}",
                                ["x"], list(parts), e.nodes, [helper.make_opsetid("", OPSET)])
