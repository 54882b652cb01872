"""The interface every ring codec implements, and the uniform min/max codec it starts from."""

from __future__ import annotations

import torch

from edgekv.reference import quant_torch as qt


class RingCodec:
    """Quantizes one ring block and returns what attention reads back (fake-quant: codes
    are never packed, packing is lossless). Keys: [..., B, D], one group per channel over
    the block's B tokens; values: [..., B, D], groups of `group` along D per token."""

    name = "codec"

    def fit(self, keys: list[torch.Tensor], values: list[torch.Tensor], block: int, group: int,
            widths: tuple[int, ...]) -> None:
        """Optional calibration: per layer, ring-ready (rotated when the cache rotates)
        key blocks [n, B, D] and value rows [m, D] of calibration text."""

    def keys(self, layer: int, x: torch.Tensor, bits: int) -> torch.Tensor:
        raise NotImplementedError

    def values(self, layer: int, x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        raise NotImplementedError

    def extra_bits(self, head_dim: int) -> float:
        """Bits per ring element the method stores beyond the bundle format's codes and
        fp16 scale/zero (CachePolicy.bits_per_element counts those)."""
        return 0.0


class UniformCodec(RingCodec):
    """The bundle format's codec: asymmetric min/max integers with fp16 scale and zero."""

    name = "uniform"

    def keys(self, layer: int, x: torch.Tensor, bits: int) -> torch.Tensor:
        return qt.fake_quantize_keys(x, bits)

    def values(self, layer: int, x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        return qt.fake_quantize_values(x, bits, group)
