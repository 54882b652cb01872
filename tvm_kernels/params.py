"""The one place that maps a CachePolicy layer to kernel parameters.

Kernels are specialised per (bits, shapes) at build time: every extent here is a
compile-time constant, so index arithmetic folds and the unpacking shifts are immediates.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekv.meta_u8 import META_FORMATS, meta_suffix
from edgekv.packing import PACKED_BITS
from edgekv.policy import (RESIDUALS, SUPPORTED_BITS, CachePolicy, KVShape, layer_buffer_names, plain_rotated,
                           residual_suffix)

PACK_BITS = PACKED_BITS
ATTN_BITS = SUPPORTED_BITS  # 16: an fp16 ring


def _check_residual(residual: str, head_dim: int) -> None:
    if residual not in RESIDUALS:
        raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
    if plain_rotated(residual) and head_dim & (head_dim - 1):
        raise ValueError(f"residual {residual!r} needs a power-of-two head_dim, got {head_dim}")


def _check_group(head_dim: int, group: int, what: str) -> None:
    if group % 8 or head_dim % group:
        raise ValueError(f"{what} {group} must be a multiple of 8 that divides head_dim {head_dim}")


def group_suffix(group: int, group_v: int) -> str:
    """Appended to kernel keys and names when ring values group otherwise than the
    sinks/residual (policy.groups_v); empty otherwise, so those names never change."""
    return "" if group_v == group else f"_gv{group_v}"


@dataclass(frozen=True)
class PackParams:
    """Quantize + pack one block: keys [1,H,B,D] per channel, values [1,H,B,D] per token
    in groups of Gv (`group_v`; the 8-bit residual input groups by G, `group`)."""

    heads: int
    head_dim: int
    block: int
    group: int
    bits: int
    residual: str = "fp16"  # input format (policy.residual): fp16, or u8 codes + scale/zero per group
    group_v: int | None = None  # value group (policy.value_group); None: `group`

    def __post_init__(self) -> None:
        _check_residual(self.residual, self.head_dim)
        if self.bits not in PACK_BITS:
            raise ValueError(f"pack supports bits {PACK_BITS}, got {self.bits}")
        if self.block % 8:
            raise ValueError(f"block must be a multiple of 8, got {self.block}")
        if self.group_v is None:
            object.__setattr__(self, "group_v", self.group)
        _check_group(self.head_dim, self.group, "group")
        _check_group(self.head_dim, self.group_v, "value group")

    @property
    def key(self) -> str:
        return (f"h{self.heads}_d{self.head_dim}_b{self.block}_g{self.group}_q{self.bits}"
                f"{group_suffix(self.group, self.group_v)}{residual_suffix(self.residual)}")


@dataclass(frozen=True)
class AttnParams:
    """Attention of C new queries (C=1: decode) over one layer's cache in storage order:
    S sinks, `slots` ring blocks of B tokens, a residual of B tokens."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    sinks: int
    slots: int
    block: int
    group: int
    bits_k: int
    bits_v: int
    chunk: int = 1
    rotate: bool = False  # quantized ring blocks hold K/V times the Hadamard matrix (policy.rotation)
    meta: str = "fp16"  # scale/zero storage (policy.meta): fp16, or u8 codes + per-block meta
    residual: str = "fp16"  # sinks/residual storage (policy.residual): fp16, or u8 codes + scale/zero
    group_v: int | None = None  # ring value group (policy.value_group); None: `group`

    def __post_init__(self) -> None:
        _check_residual(self.residual, self.head_dim)
        if self.group_v is None:
            object.__setattr__(self, "group_v", self.group)
        if self.meta not in META_FORMATS:
            raise ValueError(f"meta must be one of {META_FORMATS}, got {self.meta!r}")
        if self.rotate and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, got {self.head_dim}")
        if self.bits_k not in ATTN_BITS or self.bits_v not in ATTN_BITS:
            raise ValueError(f"attention supports bits {ATTN_BITS}, got K{self.bits_k} V{self.bits_v}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads (GQA)")
        if self.head_dim % 16 or self.block % 8:
            raise ValueError("head_dim must be a multiple of 16, block a multiple of 8")
        _check_group(self.head_dim, self.group, "group")
        _check_group(self.head_dim, self.group_v, "value group")
        if self.chunk < 1 or self.block % self.chunk:
            raise ValueError(f"chunk {self.chunk} must divide block {self.block}")
        if self.slots < 1:
            raise ValueError("the ring needs at least one slot")

    @property
    def rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def key(self) -> str:
        return (f"hq{self.num_heads}_hkv{self.num_kv_heads}_d{self.head_dim}_s{self.sinks}"
                f"_n{self.slots}_b{self.block}_g{self.group}_k{self.bits_k}_v{self.bits_v}_c{self.chunk}"
                + group_suffix(self.group, self.group_v) + ("_rot" if self.rotate else "")
                + meta_suffix(self.meta) + residual_suffix(self.residual))

    @property
    def folds_plain_values(self) -> bool:
        """Residual "u8hr" under a rotated ring: the sinks' and residual's values stay rotated
        and their P.V joins the ring's single un-rotation per query head (attention.py)."""
        return self.rotate and self.bits_v != 16 and plain_rotated(self.residual)

    @property
    def cache_names(self) -> list[str]:
        """The layer's cache buffers the kernel takes (after q), in argument order."""
        return layer_buffer_names(self.bits_k, self.bits_v, self.meta, self.residual)

    @property
    def tokens(self) -> int:
        """Cache slots the kernel can read: sinks + ring + residual."""
        return self.sinks + self.slots * self.block + self.block

    def cache_bytes(self) -> int:
        """Bytes of the layer's cache the kernel reads: the policy's own count (one layer,
        so the two never disagree about a format)."""
        policy = CachePolicy(bits_k=(self.bits_k,), bits_v=(self.bits_v,), sinks=self.sinks,
                             window=self.slots * self.block, block=self.block, group=self.group,
                             meta=self.meta, residual=self.residual, groups_v=(self.group_v,))
        return policy.layer_bytes(KVShape(1, self.num_kv_heads, self.head_dim), 0)


def value_group(policy: CachePolicy, layer: int) -> int:
    """The group a layer's kernels use for ring values: the layer's own for quantized
    values, else the policy's (16-bit values and keys have none), so kernels that do not
    differ get one key."""
    return policy.value_group(layer) if policy.bits_v[layer] != 16 else policy.group


def kernel_key(policy: CachePolicy, unit: int, num_kv_heads: int | None = None) -> tuple[int, ...]:
    """(bits_k, bits_v, value group): what tells one cache unit's attention kernel from
    another's; a unit of a split layer (policy.units) adds its KV head count."""
    key = (policy.bits_k[unit], policy.bits_v[unit], value_group(policy, unit))
    heads = len(policy.units[unit][1]) if policy.units else None
    return key if heads is None or heads == num_kv_heads else (*key, heads)


def pack_key(policy: CachePolicy, layer: int, side: str) -> tuple[str, int, int]:
    """(side, bits, value group; policy.group for keys): what tells pack kernels apart."""
    if side == "k":
        return side, policy.bits_k[layer], policy.group
    return side, policy.bits_v[layer], value_group(policy, layer)


def pack_params(policy: CachePolicy, shape: KVShape, layer: int, side: str) -> PackParams | None:
    """Pack kernel of one layer's keys ('k') or values ('v'); None at 16 bits (a copy)."""
    _, bits, group_v = pack_key(policy, layer, side)
    if bits == 16:
        return None
    return PackParams(shape.num_kv_heads, shape.head_dim, policy.block, policy.group, bits, policy.residual,
                      group_v)


def attn_params(policy: CachePolicy, shape: KVShape, layer: int, num_heads: int,
                chunk: int = 1, context: int | None = None) -> AttnParams:
    """The attention kernel of cache unit `layer` (a layer, or a split layer's unit: its own
    KV heads and their query heads)."""
    policy.check_shape(shape)
    slots = policy.ring_capacity(context) // policy.block
    hkv = len(policy.unit_heads(layer, shape.num_kv_heads))
    num_heads = num_heads // shape.num_kv_heads * hkv
    return AttnParams(num_heads, hkv, shape.head_dim, policy.sinks, slots,
                      policy.block, policy.group, policy.bits_k[layer], policy.bits_v[layer], chunk,
                      policy.rotation == "hadamard", policy.meta, policy.residual, value_group(policy, layer))
