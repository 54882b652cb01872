"""Asymmetric min/max quantization of cache blocks, numpy reference.

Keys: per channel over a block of B tokens (KIVI/KVQuant): x[..., B, D] -> codes packed
along the token axis, one (scale, zero) per channel.
Values: per token in groups of G channels: x[..., T, D] -> codes packed along head_dim,
one (scale, zero) per group.

Scale and zero are stored in fp16 and the codes are computed *with the stored fp16
values* (round half to even, then clip), so every backend that follows these steps in
fp32 arithmetic gets the same codes. The error of a dequantized element is at most
scale/2 plus the fp16 rounding of zero and scale (see `error_bound`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgekv import meta_u8
from edgekv.clipping import clipped_range
from edgekv.key_feedback import round_with_feedback
from edgekv.packing import pack, unpack

FP16_REL_EPS = 2.0**-11  # relative rounding error of float16


class Quantized(NamedTuple):
    codes: np.ndarray  # uint8, packed along the quantized axis
    scale: np.ndarray  # float16, or uint8 scale codes with 8-bit metadata
    zero: np.ndarray  # float16, or uint8 zero codes
    meta: np.ndarray | None = None  # float16 [..., 3] per block with 8-bit metadata (edgekv.meta_u8)


def _groups(mn: np.ndarray, mx: np.ndarray, bits: int, meta: str, axes: tuple[int, ...], clip: float = 1.0):
    """(stored scale, stored zero, block meta or None, scale and zero as float32) for groups
    ranging over [mn, mx], narrowed to `clip` of their span (edgekv.clipping). With "u8s"
    the KV heads are the axis before `axes` ([..., H, B, D] blocks)."""
    mn, mx = clipped_range(mn, mx, clip)
    if meta_u8.is_u8(meta):
        sc, zc, m = meta_u8.encode(mn, mx, bits, axes, meta_u8.head_axis(meta, axes))
        return (sc, zc, m, *meta_u8.decode(sc, zc, m, axes))
    if meta != "fp16":
        raise ValueError(f"metadata format must be one of {meta_u8.META_FORMATS}, got {meta!r}")
    scale, zero = _scale_zero(mn, mx, bits)
    return scale, zero, None, scale.astype(np.float32), zero.astype(np.float32)


def _stored(q: Quantized, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    if q.meta is None:
        return q.scale.astype(np.float32), q.zero.astype(np.float32)
    return meta_u8.decode(q.scale, q.zero, q.meta, axes)


def _scale_zero(mn: np.ndarray, mx: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    levels = (1 << bits) - 1
    scale = ((mx - mn) / levels).astype(np.float16)
    zero = mn.astype(np.float16)
    return scale, zero


def _codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    s = np.asarray(scale).astype(np.float32)
    z = np.asarray(zero).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    q = np.round((x - z) / safe)
    q = np.where(s > 0, q, 0.0)
    return np.clip(q, 0, (1 << bits) - 1).astype(np.uint8)


def quantize_keys(block: np.ndarray, bits: int, meta: str = "fp16", clip: float = 1.0,
                  feedback: np.ndarray | None = None) -> Quantized:
    """Keys block [..., B, D] fp -> codes [..., D, B*bits/8], scale/zero [..., D] (and with
    meta "u8", the block's meta [..., 3]); `clip`: policy.clip_ratio("k", bits);
    `feedback`: the layer's step matrices [H, D, D] (edgekv.key_feedback), else nearest."""
    x = np.asarray(block, dtype=np.float32)
    scale, zero, m, s32, z32 = _groups(x.min(axis=-2), x.max(axis=-2), bits, meta, (-1,), clip)
    if feedback is None:
        codes = _codes(x, s32[..., None, :], z32[..., None, :], bits)
    else:
        f = np.asarray(feedback, dtype=np.float32)
        steps = round_with_feedback(x, s32[..., None, :], z32[..., None, :], f,
                                    lambda v, s, z: _codes(v, s, z, bits).astype(np.float32))
        codes = np.concatenate(steps, axis=-1).astype(np.uint8)
    return Quantized(pack(np.swapaxes(codes, -1, -2), bits), scale, zero, m)


def dequantize_keys(q: Quantized, bits: int, block: int) -> np.ndarray:
    """Inverse of `quantize_keys`: [..., B, D] float32."""
    codes = unpack(q.codes, bits, block).astype(np.float32)  # [..., D, B]
    scale, zero = _stored(q, (-1,))
    return np.swapaxes(codes * scale[..., None] + zero[..., None], -1, -2)


def quantize_values(x: np.ndarray, bits: int, group: int, meta: str = "fp16", clip: float = 1.0) -> Quantized:
    """Values [..., T, D] -> codes [..., T, D*bits/8], scale/zero [..., T, D/G]. With meta
    "u8" the T tokens are one block: its meta is [..., 3]. `clip`: policy.clip_ratio("v", bits)."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    if d % group:
        raise ValueError(f"head_dim {d} is not a multiple of group {group}")
    g = x.reshape(*x.shape[:-1], d // group, group)
    scale, zero, m, s32, z32 = _groups(g.min(axis=-1), g.max(axis=-1), bits, meta, (-2, -1), clip)
    codes = _codes(g, s32[..., None], z32[..., None], bits).reshape(x.shape)
    return Quantized(pack(codes, bits), scale, zero, m)


def dequantize_values(q: Quantized, bits: int, group: int, head_dim: int) -> np.ndarray:
    """Inverse of `quantize_values`: [..., T, D] float32."""
    codes = unpack(q.codes, bits, head_dim).astype(np.float32)
    g = codes.reshape(*codes.shape[:-1], head_dim // group, group)
    scale, zero = _stored(q, (-2, -1))
    return (g * scale[..., None] + zero[..., None]).reshape(codes.shape)


def error_bound(mn: np.ndarray, mx: np.ndarray, bits: int) -> np.ndarray:
    """Largest |x - dequant(x)| for a group with range [mn, mx]: half a step, plus what
    rounding zero and scale to fp16 can shift the grid (zero by eps*|mn|, the top of
    the grid by eps*(mx - mn)), plus fp32 slack."""
    span = mx - mn
    scale = span / ((1 << bits) - 1)
    return scale * (0.5 + FP16_REL_EPS) + FP16_REL_EPS * (np.abs(mn) + span) + 1e-6 * (np.abs(mn) + np.abs(mx))
