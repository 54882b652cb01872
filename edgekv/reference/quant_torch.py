"""Torch twin of edgekv.packing and edgekv.quant, bit-exact with the numpy reference."""

from __future__ import annotations

import torch

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


def quantize_keys(block: torch.Tensor, bits: int):
    """[..., B, D] -> (codes [..., D, B*bits/8], scale [..., D], zero [..., D])."""
    x = block.float()
    scale, zero = _scale_zero(x.amin(-2), x.amax(-2), bits)
    codes = _codes(x, scale.unsqueeze(-2), zero.unsqueeze(-2), bits)
    return pack(codes.transpose(-1, -2), bits), scale, zero


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bits: int, block: int) -> torch.Tensor:
    c = unpack(codes, bits, block).float()  # [..., D, B]
    return (c * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).transpose(-1, -2)


def quantize_values(x: torch.Tensor, bits: int, group: int):
    """[..., T, D] -> (codes [..., T, D*bits/8], scale [..., T, D/G], zero [..., T, D/G])."""
    x = x.float()
    d = x.shape[-1]
    g = x.reshape(*x.shape[:-1], d // group, group)
    scale, zero = _scale_zero(g.amin(-1), g.amax(-1), bits)
    codes = _codes(g, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(x.shape)
    return pack(codes, bits), scale, zero


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int, group: int, head_dim: int) -> torch.Tensor:
    c = unpack(codes, bits, head_dim).float()
    g = c.reshape(*c.shape[:-1], head_dim // group, group)
    return (g * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).reshape(c.shape)


def fake_quantize_keys(x: torch.Tensor, bits: int) -> torch.Tensor:
    """dequantize(quantize(x)) for key blocks [..., B, D], without packing (packing is
    lossless): what attention reads back for these keys. Calibration uses it."""
    x = x.float()
    scale, zero = _scale_zero(x.amin(-2), x.amax(-2), bits)
    s, z = scale.float().unsqueeze(-2), zero.float().unsqueeze(-2)
    return _codes(x, scale.unsqueeze(-2), zero.unsqueeze(-2), bits).float() * s + z


def fake_quantize_values(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """dequantize(quantize(x)) for values [..., T, D] in groups of `group`, without packing."""
    x = x.float()
    d = x.shape[-1]
    g = x.reshape(*x.shape[:-1], d // group, group)
    scale, zero = _scale_zero(g.amin(-1), g.amax(-1), bits)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    return (_codes(g, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).float() * s + z).reshape(x.shape)
