"""Torch twin of edgekv.packing and edgekv.quant, bit-exact with the numpy reference."""

from __future__ import annotations

import torch

from edgekv import meta_u8
from edgekv.clipping import clipped_range
from edgekv.key_feedback import round_with_feedback
from edgekv.packing import packed_len


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian bit stream of uint8 codes along the last axis (see edgekv.packing)."""
    n = codes.shape[-1]
    nbytes = packed_len(n, bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.clone()
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = (codes.unsqueeze(-1) >> shifts) & 1  # [..., n, bits]
    stream = stream.reshape(*codes.shape[:-1], nbytes, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"expected {packed_len(n, bits)} bytes for {n} codes, got {packed.shape[-1]}")
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(*packed.shape[:-1], n, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device))
    return (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def _scale_zero(mn: torch.Tensor, mx: torch.Tensor, bits: int):
    levels = (1 << bits) - 1
    return ((mx - mn) / levels).to(torch.float16), mn.to(torch.float16)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s, z = scale.float(), zero.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x - z) / safe)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return q.clamp(0, (1 << bits) - 1).to(torch.uint8)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def encode_u8(mn: torch.Tensor, mx: torch.Tensor, bits: int, axes: tuple[int, ...],
              shared_axis: int | None = None):
    """Twin of edgekv.meta_u8.encode: (scale codes u8, zero codes u8, meta f16 [..., 3])."""
    levels = float((1 << bits) - 1)
    span = meta_u8.meta_axes(axes, shared_axis)
    lo = _f16(mn.amin(span, keepdim=True))
    dz = _f16((mn.amax(span, keepdim=True) - lo) / 255.0)
    zc = torch.where(dz > 0, torch.floor((mn - lo) / torch.where(dz > 0, dz, 1.0)), 0.0).clamp(0, 255)
    need = (mx - (lo + zc * dz)) / levels
    top = _f16(need.amax(span, keepdim=True) * (1 + 2**-10))
    table = torch.from_numpy(meta_u8.SCALE_TABLE)
    sc = ((top.unsqueeze(-1) * table) >= need.unsqueeze(-1)).sum(-1).sub(1).clamp(0, 255)
    meta = torch.stack([a.flatten(-len(axes))[..., 0] for a in (lo, dz, top)], -1)  # axes are trailing
    return sc.to(torch.uint8), zc.to(torch.uint8), meta.to(torch.float16)


def decode_u8(scale_code: torch.Tensor, zero_code: torch.Tensor, meta: torch.Tensor, axes: tuple[int, ...]):
    """Twin of edgekv.meta_u8.decode: (scale, zero) float32 shaped like the codes."""
    m = meta.float()
    lo, dz, top = (m[..., i].reshape(*m.shape[:-1], *(1,) * len(axes)) for i in range(meta_u8.META_FIELDS))
    table = torch.from_numpy(meta_u8.SCALE_TABLE)
    return top * table[scale_code.long()], lo + zero_code.float() * dz


def _groups(mn: torch.Tensor, mx: torch.Tensor, bits: int, meta: str, axes: tuple[int, ...], clip: float = 1.0,
            heads: int | None = None):
    """(stored scale, stored zero, block meta or None, scale and zero as float32); `heads`:
    the KV-head axis of mn that "u8s" shares meta over (default: the one before `axes`)."""
    mn, mx = clipped_range(mn, mx, clip)
    if meta_u8.is_u8(meta):
        shared = heads if meta == "u8s" and heads is not None else meta_u8.head_axis(meta, axes)
        sc, zc, m = encode_u8(mn, mx, bits, axes, shared)
        return (sc, zc, m, *decode_u8(sc, zc, m, axes))
    scale, zero = _scale_zero(mn, mx, bits)
    return scale, zero, None, scale.float(), zero.float()


def _stored(scale: torch.Tensor, zero: torch.Tensor, meta: torch.Tensor | None, axes: tuple[int, ...]):
    return (scale.float(), zero.float()) if meta is None else decode_u8(scale, zero, meta, axes)


def _key_codes(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int,
               feedback: torch.Tensor | None) -> torch.Tensor:
    """uint8 codes of key blocks x [..., B, D] on the grid s, z [..., 1, D]: nearest, or
    with the layer's feedback step matrices (edgekv.key_feedback)."""
    if feedback is None:
        return _codes(x, s, z, bits)
    steps = round_with_feedback(x, s, z, feedback.float(), lambda v, s, z: _codes(v, s, z, bits).float())
    return torch.cat(steps, -1).to(torch.uint8)


def quantize_keys(block: torch.Tensor, bits: int, meta: str = "fp16", clip: float = 1.0,
                  feedback: torch.Tensor | None = None):
    """[..., B, D] -> (codes [..., D, B*bits/8], scale [..., D], zero [..., D]), plus the
    block's meta [..., 3] ([..., 1, 3] with "u8s", blocks [..., H, B, D]); `feedback`:
    [H, D, D] step matrices."""
    x = block.float()
    scale, zero, m, s, z = _groups(x.amin(-2), x.amax(-2), bits, meta, (-1,), clip)
    codes = pack(_key_codes(x, s.unsqueeze(-2), z.unsqueeze(-2), bits, feedback).transpose(-1, -2), bits)
    return (codes, scale, zero) if m is None else (codes, scale, zero, m)


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bits: int, block: int, meta: torch.Tensor | None = None) -> torch.Tensor:
    c = unpack(codes, bits, block).float()  # [..., D, B]
    s, z = _stored(scale, zero, meta, (-1,))
    return (c * s.unsqueeze(-1) + z.unsqueeze(-1)).transpose(-1, -2)


def quantize_values(x: torch.Tensor, bits: int, group: int, meta: str = "fp16", clip: float = 1.0):
    """[..., T, D] -> (codes [..., T, D*bits/8], scale [..., T, D/G], zero [..., T, D/G]),
    plus the block's meta [..., 3] (the T tokens are one block) with 8-bit metadata ("u8s":
    [..., 1, 3], x [..., H, T, D])."""
    x = x.float()
    d = x.shape[-1]
    g = x.reshape(*x.shape[:-1], d // group, group)
    scale, zero, m, s, z = _groups(g.amin(-1), g.amax(-1), bits, meta, (-2, -1), clip)
    codes = pack(_codes(g, s.unsqueeze(-1), z.unsqueeze(-1), bits).reshape(x.shape), bits)
    return (codes, scale, zero) if m is None else (codes, scale, zero, m)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int, group: int, head_dim: int, meta: torch.Tensor | None = None) -> torch.Tensor:
    c = unpack(codes, bits, head_dim).float()
    g = c.reshape(*c.shape[:-1], head_dim // group, group)
    s, z = _stored(scale, zero, meta, (-2, -1))
    return (g * s.unsqueeze(-1) + z.unsqueeze(-1)).reshape(c.shape)


def fake_quantize_keys(x: torch.Tensor, bits: int, meta: str = "fp16", clip: float = 1.0,
                       feedback: torch.Tensor | None = None, heads: int = -3) -> torch.Tensor:
    """dequantize(quantize(x)) for key blocks [..., B, D], without packing (packing is
    lossless): what attention reads back for these keys. Calibration uses it. `heads`: the
    KV-head axis of x (negative), over which "u8s" shares a block's meta."""
    x = x.float()
    *_, s, z = _groups(x.amin(-2), x.amax(-2), bits, meta, (-1,), clip, heads + 1)
    s, z = s.unsqueeze(-2), z.unsqueeze(-2)
    return _key_codes(x, s, z, bits, feedback).float() * s + z


def fake_quantize_values(x: torch.Tensor, bits: int, group: int, meta: str = "fp16",
                         block: int | None = None, clip: float = 1.0) -> torch.Tensor:
    """dequantize(quantize(x)) for values [..., T, D] in groups of `group`, without packing.
    With 8-bit metadata, `block` tokens share a block's metadata (T a multiple of it), and
    with "u8s" so do the KV heads (x [..., H, T, D])."""
    x = x.float()
    shape, d = x.shape, x.shape[-1]
    blocked = meta_u8.is_u8(meta)
    if blocked:
        x = x.reshape(*shape[:-2], shape[-2] // block, block, d)
    g = x.reshape(*x.shape[:-1], d // group, group)
    *_, s, z = _groups(g.amin(-1), g.amax(-1), bits, meta, (-2, -1), clip, -4 if blocked else None)
    return (_codes(g, s.unsqueeze(-1), z.unsqueeze(-1), bits).float() * s.unsqueeze(-1) + z.unsqueeze(-1)).reshape(shape)
