"""Non-uniform per-layer codebooks (KVQuant's nuq): each group is still normalized by its
min/max (fp16 scale and zero, as in the bundle format), but the 2^b levels inside [0, 1]
are fitted per layer, side and width by 1-D k-means on calibration data (weighted by each
group's squared range, so the fit minimizes the error in the cache's own units) instead
of being evenly spaced. The codebooks cost 2^b fp16 numbers per layer and side, a constant
that no cached token pays for."""

from __future__ import annotations

import torch

from edgekv.methods.base import RingCodec
from edgekv.reference import quant_torch as qt

SAMPLE = 200_000  # normalized values per fit; more changes the levels by < 1e-3


def _normalized(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's place in its group's [min, max], and its weight: the squared range,
    since an error in [0, 1] costs range^2 times as much in the cache's units."""
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    span = (mx - mn).clamp_min(1e-12)
    return ((x - mn) / span).flatten(), (span ** 2).expand_as(x).flatten()


def kmeans_levels(u: torch.Tensor, bits: int, weight: torch.Tensor | None = None,
                  iters: int = 50) -> torch.Tensor:
    """Lloyd's algorithm in 1-D, from the uniform grid: sorted levels in [0, 1]. The end
    levels stay at 0 and 1: every group's min and max land there exactly, and they are its
    largest-magnitude elements (freeing them cost 2x the error in a first try)."""
    weight = torch.ones_like(u) if weight is None else weight
    if u.numel() > SAMPLE:
        pick = torch.randperm(u.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE]
        u, weight = u[pick], weight[pick]
    c = torch.linspace(0, 1, 1 << bits)
    for _ in range(iters):
        idx = _nearest(u, c)
        sums = torch.zeros_like(c).index_add_(0, idx, u * weight)
        counts = torch.zeros_like(c).index_add_(0, idx, weight)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort().values
        c[0], c[-1] = 0.0, 1.0
    return c


def _nearest(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(u, mid)


def _fake_quant(x: torch.Tensor, levels: torch.Tensor, dim: int) -> torch.Tensor:
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, zero = qt._scale_zero(mn, mx, 1)  # fp16 range and zero, as the format stores them
    span = scale.float().clamp_min(1e-30)
    u = (x - zero.float()) / span
    return levels[_nearest(u, levels)] * scale.float() + zero.float()


class CodebookCodec(RingCodec):
    name = "codebook"

    def __init__(self) -> None:
        self.levels: dict[tuple[str, int, int], torch.Tensor] = {}

    def fit(self, keys, values, block, group, widths) -> None:
        for layer, (k, v) in enumerate(zip(keys, values)):
            uk = _normalized(k.float(), -2)
            uv = _normalized(v.float().unflatten(-1, (v.shape[-1] // group, group)), -1)
            for bits in widths:
                if bits < 16:
                    self.levels["k", layer, bits] = kmeans_levels(uk[0], bits, uk[1])
                    self.levels["v", layer, bits] = kmeans_levels(uv[0], bits, uv[1])

    def keys(self, layer: int, x: torch.Tensor, bits: int) -> torch.Tensor:
        return _fake_quant(x.float(), self.levels["k", layer, bits], -2)

    def values(self, layer: int, x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        g = x.float().unflatten(-1, (x.shape[-1] // group, group))
        return _fake_quant(g, self.levels["v", layer, bits], -1).flatten(-2)
