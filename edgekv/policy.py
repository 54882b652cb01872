"""The cache policy and its exact byte accounting (DESIGN.md "The cache policy").

Per layer and KV head the cache is [sinks S][ring W tokens, b-bit][residual B], sinks and
residual in fp16 or, with residual "u8", in 8-bit codes per token with an fp16 scale/zero
per group (edgekv.quant.quantize_values at 8 bits).
Every tensor a backend allocates is listed by `layer_tensors`; bytes are computed from
the policy alone, so what is reported is what is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

from edgekv.errors import PolicyError
from edgekv.key_feedback import KeyFeedback
from edgekv.meta_u8 import META_FIELDS, META_FORMATS, is_u8, meta_heads
from edgekv.packing import PACKED_BITS

SUPPORTED_BITS = (*PACKED_BITS, 16)  # 16: the ring stays fp16
PositionMode = Literal["cache", "original"]
ROTATIONS = ("none", "hadamard")
METAS = META_FORMATS  # scale/zero storage (edgekv.meta_u8)
# storage of the sinks and the residual (CachePolicy.residual): fp16, or 8-bit codes per token
# with an fp16 scale/zero per group of G channels ("u8") or per token and KV head ("u8h"), or
# per token and KV head after a Hadamard rotation along head_dim ("u8hr": the rotation spreads
# pre-RoPE keys' outlier channels, so one scale per head costs little; undone when read)
RESIDUALS = ("fp16", "u8", "u8h", "u8hr")
# What `edgekv export`/`eval` store unless told otherwise (CachePolicy itself and a manifest
# without these entries mean fp16, the formats before 8-bit storage existed).
# u8s/u8hr make --bits 3 0.2298x of fp16 at W1024 (u8/u8: 0.2318x); with calibrated value
# groups they have the lowest KL per byte at 2, 3 and 4 bits (BENCHMARKS.md "The compact
# formats with value groups"). Models whose head_dim is not a power of two need u8h.
DEFAULT_META, DEFAULT_RESIDUAL = "u8s", "u8hr"


def plain_group(residual: str, group: int, head_dim: int) -> int:
    """Channels per scale/zero of 8-bit sinks/residual: G ("u8") or the whole head ("u8h", "u8hr")."""
    return head_dim if residual in ("u8h", "u8hr") else group


def plain_rotated(residual: str) -> bool:
    """Whether 8-bit sinks/residual are stored Hadamard-rotated along head_dim: x @ H is
    quantized and a read returns dequantized @ H (H is symmetric and orthonormal)."""
    return residual == "u8hr"


def residual_suffix(residual: str) -> str:
    """Appended to the names of graph functions and kernels built for one sink/residual
    format, so bundles and kernel libraries never mix them."""
    return {"fp16": "", "u8": "_r8", "u8h": "_r8h", "u8hr": "_r8hr"}[residual]


def plain_names(name: str, residual: str) -> list[str]:
    """The buffers that hold sink/residual tensor `name` ("sink_k", ..., or a graph's "k"):
    itself in fp16, or with an 8-bit residual its codes, name_scale and name_zero."""
    return [name] if residual == "fp16" else [name, f"{name}_scale", f"{name}_zero"]


def quantized_parts(meta: str) -> tuple[str, ...]:
    """What a quantized ring side stores: codes, scale, zero, and per block meta with "u8"."""
    return ("codes", "scale", "zero", "meta") if is_u8(meta) else ("codes", "scale", "zero")


def packed_prefix(policy: "CachePolicy", side: str, bits: int, group: int | None = None) -> str:
    """Prefix of pack.onnx's outputs for one width of `side` (k4_codes, v3_scale, ...).
    Values quantized with a value group other than policy.group (policy.groups_v) are
    separate outputs with the group in the name (v3g64_codes), so one graph serves every layer."""
    return f"{side}{bits}" + ("" if group is None or group == policy.group else f"g{group}")


def layer_buffer_names(bits_k: int, bits_v: int, meta: str = "fp16", residual: str = "fp16") -> list[str]:
    """A layer's cache buffers in CachePolicy.layer_tensors order: sinks and residual
    (plain_names), then each ring side. What the attention function and kernels take."""
    plain = [n for part in ("sink", "residual") for side in "kv" for n in plain_names(f"{part}_{side}", residual)]
    ring = [[f"ring_{side}"] if bits == 16 else [f"ring_{side}_{n}" for n in quantized_parts(meta)]
            for side, bits in (("k", bits_k), ("v", bits_v))]
    return plain + ring[0] + ring[1]


@dataclass(frozen=True)
class KVShape:
    """What a model contributes to the cache's shape."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    @property
    def nbytes(self) -> int:
        itemsize = {"float16": 2, "uint8": 1, "float32": 4}[self.dtype]
        n = 1
        for s in self.shape:
            n *= s
        return n * itemsize


@dataclass(frozen=True)
class CachePolicy:
    """sinks S, window W (None: never evict), block B (= fp16 residual length),
    value group G, code width per layer for keys and values, position mode, and the
    rotation of quantized ring blocks ("hadamard": K and V are multiplied by an orthonormal
    Hadamard matrix along head_dim before quantizing and un-rotated when read; sinks, the
    residual and 16-bit layers are never rotated), and the scale/zero storage ("fp16" per
    group, or "u8": 8-bit codes per group plus three fp16 numbers per block and head, or
    "u8s": those three shared by the block's KV heads, edgekv.meta_u8), and `clip`: (side
    "k"/"v", width, ratio) entries that narrow each group's quantization range to `ratio` of its span (edgekv.clipping; absent: 1), and
    `key_feedback`: per-layer step matrices that round keys query-aware instead of to the
    nearest code (edgekv.key_feedback; None: nearest), and `residual`: how the sinks and
    the residual are stored ("fp16", or "u8": per token 8-bit codes with an fp16 scale and
    zero per group of G channels, 8 + 32/G bits per element; or "u8h": one fp16 scale and zero
    per token and KV head, 8 + 32/head_dim bits; or "u8hr": u8h of the tokens rotated by
    a Hadamard matrix along head_dim, the rotation undone when read; new tokens are rounded that way before
    attention sees them), and `groups_v`: the value group of each layer's ring (empty:
    G everywhere; the sinks and residual always group by G), so calibration can coarsen
    value metadata only where it costs little (edgekv.allocation), and `units`: the cache
    units, (layer, its KV heads) each, when widths differ between a layer's KV heads (empty:
    one unit per layer holding all its heads). bits_k, bits_v and groups_v then have one
    entry per unit; a unit is a whole cache of its own (sinks, residual and ring) over its
    heads, so every backend runs a split layer as its units side by side."""

    bits_k: tuple[int, ...]
    bits_v: tuple[int, ...]
    sinks: int = 4
    window: int | None = 1024
    block: int = 32
    group: int = 32
    positions: PositionMode = "cache"
    rotation: str = "none"
    meta: str = "fp16"
    clip: tuple[tuple[str, int, float], ...] = ()
    key_feedback: KeyFeedback | None = None
    residual: str = "fp16"
    groups_v: tuple[int, ...] = ()
    units: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple((int(layer), tuple(int(h) for h in heads))
                                                for layer, heads in self.units))
        object.__setattr__(self, "bits_k", tuple(int(b) for b in self.bits_k))
        object.__setattr__(self, "bits_v", tuple(int(b) for b in self.bits_v))
        # () and "every layer at `group`" are one policy: they compare and hash equal.
        groups = tuple(int(g) for g in self.groups_v)
        object.__setattr__(self, "groups_v", () if all(g == self.group for g in groups) else groups)
        # Sorted, and ratio-1 entries dropped: equal policies compare and hash equal.
        object.__setattr__(self, "clip", tuple(sorted((str(s), int(b), float(r)) for s, b, r in self.clip
                                                      if float(r) != 1.0)))
        self._validate()

    @classmethod
    def uniform(cls, num_layers: int, bits: int = 3, bits_k: int | None = None,
                bits_v: int | None = None, **kw) -> "CachePolicy":
        bk = bits if bits_k is None else bits_k
        bv = bits if bits_v is None else bits_v
        return cls(bits_k=(bk,) * num_layers, bits_v=(bv,) * num_layers, **kw)

    def with_(self, **kw) -> "CachePolicy":
        return replace(self, **kw)

    def value_group(self, unit: int) -> int:
        """Channels per scale/zero group of a unit's ring values (a unit is a layer unless
        the policy has `units`)."""
        return self.groups_v[unit] if self.groups_v else self.group

    def pack_variant(self, unit: int) -> dict[str, int]:
        """A unit's key width, value width and value group by the names of pack.onnx's
        per-unit selector inputs (export.onnx_pack.pack_selectors declares those it needs)."""
        return {"k_bits": self.bits_k[unit], "v_bits": self.bits_v[unit], "v_group": self.value_group(unit)}

    @property
    def num_layers(self) -> int:
        return self.units[-1][0] + 1 if self.units else len(self.bits_k)

    @property
    def num_units(self) -> int:
        """Cache units: one per layer, or `units` when a layer's heads differ in width."""
        return len(self.bits_k)

    def unit_layer(self, unit: int) -> int:
        return self.units[unit][0] if self.units else unit

    def layer_units(self, layer: int) -> list[int]:
        """The units that hold `layer`'s heads, in order."""
        if not self.units:
            return [layer]
        return [u for u, (i, _) in enumerate(self.units) if i == layer]

    def unit_heads(self, unit: int, num_kv_heads: int) -> tuple[int, ...]:
        """The KV heads (of its layer) a unit holds."""
        return self.units[unit][1] if self.units else tuple(range(num_kv_heads))

    @classmethod
    def from_heads(cls, bits_k: list, bits_v: list, groups_v: list | None = None, **kw) -> "CachePolicy":
        """A policy from widths per layer and KV head (`bits_k[layer][head]`, value groups
        likewise): a layer's heads that share (key width, value width, value group) form one
        unit, in order of their first head; a layer whose heads all agree is one plain unit,
        and a policy whose layers all agree has no `units` (today's per-layer format)."""
        group = kw.get("group", 32)
        groups_v = groups_v or [[group] * len(row) for row in bits_k]
        units, bk, bv, gv = [], [], [], []
        for layer, row in enumerate(zip(bits_k, bits_v, groups_v)):
            classes: dict[tuple[int, int, int], list[int]] = {}
            for h, key in enumerate(zip(*row)):
                classes.setdefault(tuple(int(x) for x in key), []).append(h)
            for (k, v, g), heads in classes.items():
                units.append((layer, tuple(heads)))
                bk.append(k), bv.append(v), gv.append(g)
        split = len(units) > len(bits_k)
        return cls(bits_k=tuple(bk), bits_v=tuple(bv), groups_v=tuple(gv), units=tuple(units) if split else (), **kw)

    def with_head_widths(self, bits_k: list, bits_v: list, groups_v: list | None = None) -> "CachePolicy":
        """This policy with widths per layer and KV head instead (from_heads)."""
        keep = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("bits_k", "bits_v", "groups_v", "units")}
        return CachePolicy.from_heads(bits_k, bits_v, groups_v, **keep)

    def head_widths(self, num_kv_heads: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(key width, value width, value group) of every KV head, layer-major: the inverse
        of from_heads."""
        out = [[0] * (self.num_layers * num_kv_heads) for _ in range(3)]
        for u in range(self.num_units):
            for h in self.unit_heads(u, num_kv_heads):
                at = self.unit_layer(u) * num_kv_heads + h
                out[0][at], out[1][at], out[2][at] = self.bits_k[u], self.bits_v[u], self.value_group(u)
        return tuple(out[0]), tuple(out[1]), tuple(out[2])

    @property
    def ring_blocks(self) -> int | None:
        return None if self.window is None else self.window // self.block

    def _validate(self) -> None:
        if not self.bits_k or len(self.bits_k) != len(self.bits_v):
            raise PolicyError(f"bits_k and bits_v need one entry per layer "
                              f"(got {len(self.bits_k)} and {len(self.bits_v)})")
        if self.units:
            self._validate_units()
        for side, bits in (("keys", self.bits_k), ("values", self.bits_v)):
            bad = sorted({b for b in bits if b not in SUPPORTED_BITS})
            if bad:
                raise PolicyError(f"bits for {side} must be one of {SUPPORTED_BITS}, got {bad}")
        if self.block < 8 or self.block % 8:
            raise PolicyError(f"block must be a positive multiple of 8 (so packed blocks end "
                              f"on a byte boundary), got {self.block}")
        if self.group < 8 or self.group % 8:
            raise PolicyError(f"group must be a positive multiple of 8, got {self.group}")
        if self.sinks < 0:
            raise PolicyError(f"sinks must be >= 0, got {self.sinks}")
        if self.window is not None:
            if self.window < self.block or self.window % self.block:
                raise PolicyError(f"window must be a positive multiple of block {self.block} "
                                  f"(the ring evicts whole blocks), got {self.window}")
        if self.positions not in ("cache", "original"):
            raise PolicyError(f"positions must be 'cache' or 'original', got {self.positions!r}")
        if self.rotation not in ROTATIONS:
            raise PolicyError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if self.residual not in RESIDUALS:
            raise PolicyError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.groups_v and len(self.groups_v) != len(self.bits_v):
            raise PolicyError(f"groups_v needs one entry per layer (got {len(self.groups_v)} "
                              f"for {len(self.bits_v)} layers)")
        bad = sorted({g for g in self.groups_v if g < 8 or g % 8})
        if bad:
            raise PolicyError(f"value groups must be positive multiples of 8, got {bad}")
        if self.meta not in METAS:
            raise PolicyError(f"meta must be one of {METAS}, got {self.meta!r}")
        seen = set()
        for side, bits, ratio in self.clip:
            if side not in ("k", "v") or bits not in SUPPORTED_BITS or bits == 16 or not 0.5 <= ratio <= 1.0:
                raise PolicyError(f"clip entries are (side 'k' or 'v', a width below 16, ratio in "
                                  f"[0.5, 1]), got {(side, bits, ratio)}")
            if (side, bits) in seen:
                raise PolicyError(f"clip has two ratios for {side} at {bits} bits")
            seen.add((side, bits))

    def _validate_units(self) -> None:
        if len(self.units) != len(self.bits_k):
            raise PolicyError(f"bits_k and bits_v need one entry per unit ({len(self.units)} units, "
                              f"{len(self.bits_k)} entries)")
        layers = [layer for layer, _ in self.units]
        if layers[0] != 0 or any(b - a not in (0, 1) for a, b in zip(layers, layers[1:])):
            raise PolicyError(f"units must list layers 0, 1, ... in order, got layers {layers}")
        for layer in range(self.num_layers):
            heads = [h for u in self.layer_units(layer) for h in self.units[u][1]]
            if not all(self.units[u][1] for u in self.layer_units(layer)) or len(set(heads)) != len(heads) \
                    or min(heads) < 0:
                raise PolicyError(f"layer {layer}'s units must hold distinct heads, got "
                                  f"{[self.units[u][1] for u in self.layer_units(layer)]}")

    def clip_ratio(self, side: str, bits: int) -> float:
        """The range ratio `side` ("k"/"v") quantizes with at `bits` (1: plain min/max)."""
        return next((r for s, b, r in self.clip if (s, b) == (side, bits)), 1.0)

    def check_shape(self, shape: KVShape) -> None:
        """Errors for a policy that does not fit a model's cache shape."""
        if shape.num_layers != self.num_layers:
            raise PolicyError(f"policy has bits for {self.num_layers} layers, model has {shape.num_layers}")
        for layer in range(self.num_layers) if self.units else ():
            heads = sorted(h for u in self.layer_units(layer) for h in self.units[u][1])
            if heads != list(range(shape.num_kv_heads)):
                raise PolicyError(f"layer {layer}'s units hold heads {heads}, the model has "
                                  f"{shape.num_kv_heads} KV heads")
        for g in {self.group, *self.groups_v}:
            if shape.head_dim % g or shape.head_dim % 8:
                raise PolicyError(f"group {g} must divide head_dim {shape.head_dim}")
        if self.key_feedback is not None:
            want = [shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.head_dim]
            if list(self.key_feedback.matrices.shape) != want:
                raise PolicyError(f"key feedback matrices are {list(self.key_feedback.matrices.shape)}, "
                                  f"the model's cache needs {want}")
        # Both Hadamard rotations need a power-of-two head_dim; name every fix in one message.
        fixes = [fix for rotated, fix in ((self.rotation == "hadamard", "rotation 'none'"),
                                          (plain_rotated(self.residual), "residual 'u8h'")) if rotated]
        if fixes and shape.head_dim & (shape.head_dim - 1):
            raise PolicyError(f"a Hadamard rotation needs a power-of-two head_dim, got {shape.head_dim}; "
                              f"use {' and '.join(fixes)}")

    # ---- byte accounting -------------------------------------------------------------
    def ring_capacity(self, context: int | None = None) -> int:
        """Ring tokens: the window, or for a never-evicting cache enough whole blocks
        to hold `context` tokens."""
        if self.window is not None:
            return self.window
        if context is None:
            raise PolicyError("a cache without a window needs a context length to size it")
        past_sinks = max(0, context - self.sinks)
        return -(-past_sinks // self.block) * self.block

    def layer_tensors(self, shape: KVShape, layer: int, context: int | None = None,
                      batch: int = 1) -> list[TensorSpec]:
        """Every buffer of one unit's cache (a layer's, unless the policy has `units`), as a
        backend allocates it."""
        h, d, b, g = len(self.unit_heads(layer, shape.num_kv_heads)), shape.head_dim, self.block, self.value_group(layer)
        w = self.ring_capacity(context)
        nblk = w // b
        bk, bv = self.bits_k[layer], self.bits_v[layer]
        pre = (batch, h)
        md = "uint8" if is_u8(self.meta) else "float16"
        meta_shape = (batch, meta_heads(self.meta, h), nblk, META_FIELDS)
        t = [spec for part, n in (("sink", self.sinks), ("residual", b)) for side in "kv"
             for spec in self.plain_tensors(f"{part}_{side}", (*pre, n, d))]
        if bk == 16:
            t.append(TensorSpec("ring_k", (*pre, nblk, b, d), "float16"))
        else:
            t += [TensorSpec("ring_k_codes", (*pre, nblk, d, b * bk // 8), "uint8"),
                  TensorSpec("ring_k_scale", (*pre, nblk, d), md),
                  TensorSpec("ring_k_zero", (*pre, nblk, d), md)]
            if is_u8(self.meta):
                t.append(TensorSpec("ring_k_meta", meta_shape, "float16"))
        if bv == 16:
            t.append(TensorSpec("ring_v", (*pre, w, d), "float16"))
        else:
            t += [TensorSpec("ring_v_codes", (*pre, w, d * bv // 8), "uint8"),
                  TensorSpec("ring_v_scale", (*pre, w, d // g), md),
                  TensorSpec("ring_v_zero", (*pre, w, d // g), md)]
            if is_u8(self.meta):
                t.append(TensorSpec("ring_v_meta", meta_shape, "float16"))
        return t

    def residual_group(self, head_dim: int) -> int:
        """Channels per scale/zero of the 8-bit sinks and residual: G ("u8"), or the whole
        head ("u8h", "u8hr"; fp16 keeps no scale, and this is then unused)."""
        return plain_group(self.residual, self.group, head_dim)

    def plain_tensors(self, name: str, shape: tuple[int, ...]) -> list[TensorSpec]:
        """A sink or residual buffer [..., T, D]: fp16, or with an 8-bit residual the codes
        plus an fp16 scale and zero per group (`residual_group`; named name_scale, name_zero)."""
        if self.residual == "fp16":
            return [TensorSpec(name, shape, "float16")]
        codes, scale, zero = plain_names(name, self.residual)
        groups = (*shape[:-1], shape[-1] // self.residual_group(shape[-1]))
        return [TensorSpec(codes, shape, "uint8"), TensorSpec(scale, groups, "float16"),
                TensorSpec(zero, groups, "float16")]

    def scale_zero_bits(self, group: int) -> float:
        """Scale/zero bits per ring element when `group` elements share them (value
        channels, or a key channel's block of tokens); the per-block meta of "u8" is not
        included: it does not depend on the group."""
        return (16 if is_u8(self.meta) else 32) / group

    def coarse_value_group(self, head_dim: int) -> int | None:
        """The value group calibration may choose instead of `group` (twice as many
        channels share a scale/zero), or None when it does not divide head_dim."""
        g = 2 * self.group
        return g if head_dim % g == 0 else None

    def layer_bytes(self, shape: KVShape, layer: int, context: int | None = None) -> int:
        return sum(t.nbytes for t in self.layer_tensors(shape, layer, context))

    def total_bytes(self, shape: KVShape, context: int | None = None) -> int:
        self.check_shape(shape)
        return sum(self.layer_bytes(shape, u, context) for u in range(self.num_units))

    def fp16_equivalent(self) -> "CachePolicy":
        """The same geometry all in fp16 (ring, sinks, residual): the baseline for ratios."""
        n = self.num_layers
        return replace(self, bits_k=(16,) * n, bits_v=(16,) * n, residual="fp16", groups_v=(), units=())

    def fp16_ratio(self, shape: KVShape, context: int | None = None) -> float:
        return self.total_bytes(shape, context) / self.fp16_equivalent().total_bytes(shape, context)

    def ring_bytes_per_token(self, shape: KVShape) -> float:
        """Marginal bytes one more window token costs across all layers, metadata included."""
        d = shape.head_dim
        total = 0.0
        for i, (bk, bv) in enumerate(zip(self.bits_k, self.bits_v)):
            h = len(self.unit_heads(i, shape.num_kv_heads))
            # meta bytes per block and head ("u8s": one set per block for the unit's heads)
            per_block = 2 * META_FIELDS * meta_heads(self.meta, h) / h if is_u8(self.meta) else 0
            for bits, group in ((bk, self.block), (bv, self.value_group(i))):
                total += h * d * 2 if bits == 16 else \
                    h * (d * (bits + self.scale_zero_bits(group)) / 8 + per_block / self.block)
        return total

    def average_bits(self) -> float:
        """Mean code width over K and V of all layers and heads (metadata excluded)."""
        weights = [len(heads) for _, heads in self.units] or [1] * self.num_units
        return sum(w * (k + v) for w, k, v in zip(weights, self.bits_k, self.bits_v)) / (2 * sum(weights))

    def bits_per_element(self, shape: KVShape) -> float:
        """Ring bits per stored K/V element with scale/zero metadata included: what a window
        token really costs, as a code width (the average code width plus metadata)."""
        return 8 * self.ring_bytes_per_token(shape) / (2 * self.num_layers * shape.num_kv_heads * shape.head_dim)

    def describe(self) -> str:
        ks, vs = sorted(set(self.bits_k)), sorted(set(self.bits_v))
        k = str(ks[0]) if len(ks) == 1 else "mixed"
        v = str(vs[0]) if len(vs) == 1 else "mixed"
        w = "inf" if self.window is None else str(self.window)
        rot = "" if self.rotation == "none" else f" rot={self.rotation}"
        meta = "" if self.meta == "fp16" else f" meta={self.meta}"
        clip = "" if not self.clip else " clip=" + ",".join(f"{s}{b}:{r:g}" for s, b, r in self.clip)
        fb = "" if self.key_feedback is None else " keys=feedback"
        res = "" if self.residual == "fp16" else f" residual={self.residual}"
        gv = "" if not self.groups_v else " Gv=" + ",".join(f"{g}x{self.groups_v.count(g)}"
                                                            for g in sorted(set(self.groups_v)))
        units = "" if not self.units else f" units={len(self.units)}"  # widths per KV head
        return (f"K{k}/V{v} S{self.sinks} W{w} B{self.block} G{self.group} pos={self.positions}"
                f"{rot}{meta}{clip}{fb}{res}{gv}{units}")
