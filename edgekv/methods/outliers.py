"""Dense-and-sparse quantization (KVQuant): the elements farthest from their group's mean
are kept exactly (fp16 value + 16-bit position in the block) and left out of the min/max
range of the rest, which the uniform codec then quantizes with a narrower grid."""

from __future__ import annotations

import torch

from edgekv.methods.base import RingCodec
from edgekv.reference import quant_torch as qt

ENTRY_BITS = 32  # fp16 value + 16-bit index per kept element


def _largest(dev: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the `fraction` largest of `dev` [..., B, D] in each block (the last
    two axes), one budget per block and leading index."""
    flat = dev.flatten(-2)
    k = int(round(fraction * flat.shape[-1]))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask.scatter_(-1, flat.topk(k, dim=-1).indices, True)
    return mask.view_as(dev)


def _fake_quant(x: torch.Tensor, keep: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Min/max quantization along `dim` over the elements not kept; kept ones pass exactly
    (after the fp16 rounding the sparse list stores)."""
    inf = torch.tensor(float("inf"))
    mn = torch.where(keep, inf, x).amin(dim, keepdim=True)
    mx = torch.where(keep, -inf, x).amax(dim, keepdim=True)
    mn, mx = torch.where(torch.isinf(mn), 0.0, mn), torch.where(torch.isinf(mx), 0.0, mx)
    scale, zero = qt._scale_zero(mn, mx, bits)
    deq = qt._codes(x.clamp(mn, mx), scale, zero, bits).float() * scale.float() + zero.float()
    return torch.where(keep, x.to(torch.float16).float(), deq)


class OutlierCodec(RingCodec):
    name = "outliers"

    def __init__(self, fraction: float = 0.01) -> None:
        self.fraction = fraction

    def keys(self, layer: int, x: torch.Tensor, bits: int) -> torch.Tensor:
        x = x.float()  # [..., B, D]: a group is one channel over the block
        keep = _largest((x - x.mean(-2, keepdim=True)).abs(), self.fraction)
        return _fake_quant(x, keep, bits, -2)

    def values(self, layer: int, x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        x = x.float()  # [..., B, D]: a group is `group` channels of one token
        g = x.unflatten(-1, (x.shape[-1] // group, group))
        keep = _largest((g - g.mean(-1, keepdim=True)).abs().flatten(-2), self.fraction)
        return _fake_quant(g, keep.view_as(g), bits, -1).flatten(-2)

    def extra_bits(self, head_dim: int) -> float:
        return self.fraction * ENTRY_BITS
