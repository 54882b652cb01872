"""8-bit scale/zero metadata (policy.meta = "u8"), numpy reference.

fp16 scale and zero cost 32 bits per group: 1 bit per element at block = group = 32, a
quarter of a 3-bit ring. Here each group stores an 8-bit zero code and an 8-bit scale code,
and each block and KV head three fp16 numbers, `meta` = (lo, dz, top):

    zero  = lo + zero_code * dz          (lo: the block's lowest group minimum,
                                          dz: (highest minimum - lo) / 255)
    scale = top * SCALE_TABLE[scale_code] (top: the block's largest scale,
                                          SCALE_TABLE[e] = 2**(-e/32))

A group's zero code is rounded down and its scale code chosen as the smallest scale that
still reaches the group's maximum from that zero, so the grid covers the group (up to the
fp16 rounding of lo, as fp16 zeros round today). The scale code is found by comparing
against the table rather than by a logarithm, and every step is one IEEE fp32 operation,
so the numpy, torch and ONNX encoders agree bit for bit. bench/methods.py measured what
it costs (BENCHMARKS.md "8-bit scale/zero").
"""

from __future__ import annotations

import numpy as np

# "u8s": the same codes, with (lo, dz, top) shared by all KV heads of a block (stored once
# per block, [..., 1, 3]): 4 fewer fp16 numbers per block and side at 3 KV heads
META_FORMATS = ("fp16", "u8", "u8s")
# Bundles store codes, not these constants: changing SCALE_STEPS or the encoding is a new
# format and needs a new name in META_FORMATS, or "u8" bundles would decode wrongly.
SCALE_STEPS = 32  # scale codes per octave: 2.2 % steps over a 2**8 range per block
SCALE_TABLE = np.exp2(-np.arange(256, dtype=np.float64) / SCALE_STEPS).astype(np.float32)
META_FIELDS = 3  # lo, dz, top (fp16) per block and KV head
F32 = np.float32


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def is_u8(meta: str) -> bool:
    """Whether scale/zero are 8-bit codes with per-block meta ("u8", or "u8s" shared by heads)."""
    return meta in ("u8", "u8s")


def meta_suffix(meta: str) -> str:
    """Appended to graph function and kernel names built for one scale/zero format."""
    return {"fp16": "", "u8": "_m8", "u8s": "_m8s"}[meta]


def meta_heads(meta: str, num_kv_heads: int) -> int:
    """KV heads with their own per-block meta: all of them, or one set shared ("u8s")."""
    return 1 if meta == "u8s" else num_kv_heads


def head_axis(meta: str, axes: tuple[int, ...]) -> int | None:
    """The axis "u8s" shares a block's meta over: the KV heads, just before the groups' trailing
    `axes` ([..., H, B, D] blocks); None for the per-head formats."""
    return min(axes) - 1 if meta == "u8s" else None


def meta_axes(axes: tuple[int, ...], shared_axis: int | None) -> tuple[int, ...]:
    """The axes one block's meta spans: its groups' `axes`, plus the KV-head axis with "u8s"."""
    return axes if shared_axis is None else (shared_axis, *axes)


def encode(mn: np.ndarray, mx: np.ndarray, bits: int, axes: tuple[int, ...], shared_axis: int | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group ranges [mn, mx] (float32, the block's groups along trailing `axes`) -> (scale
    codes uint8, zero codes uint8, meta float16 [..., 3] with `axes` reduced away).
    `shared_axis` ("u8s": the KV-head axis): one meta for all of it, kept there as size 1."""
    mn, mx = np.asarray(mn, F32), np.asarray(mx, F32)
    levels = F32((1 << bits) - 1)
    span = meta_axes(axes, shared_axis)
    lo = _f16(mn.min(axis=span, keepdims=True))
    dz = _f16((mn.max(axis=span, keepdims=True) - lo) / F32(255))
    zc = np.clip(np.where(dz > 0, np.floor((mn - lo) / np.where(dz > 0, dz, F32(1))), F32(0)), 0, 255)
    need = (mx - (lo + zc * dz)) / levels
    top = _f16(need.max(axis=span, keepdims=True) * F32(1 + 2**-10))  # fp16 must not round below
    reach = (top[..., None] * SCALE_TABLE) >= need[..., None]
    sc = np.clip(reach.sum(axis=-1) - 1, 0, 255)
    meta = np.stack([a.squeeze(axis=axes) for a in (lo, dz, top)], axis=-1)
    return sc.astype(np.uint8), zc.astype(np.uint8), meta.astype(np.float16)


def decode(scale_code: np.ndarray, zero_code: np.ndarray, meta: np.ndarray, axes: tuple[int, ...]
           ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) float32 shaped like the codes; `meta` [..., 3] broadcast over `axes`."""
    m = np.asarray(meta, dtype=np.float32)
    lo, dz, top = (np.expand_dims(m[..., i], axes) for i in range(META_FIELDS))
    zero = lo + zero_code.astype(F32) * dz
    scale = top * SCALE_TABLE[scale_code.astype(np.int64)]
    return scale, zero
