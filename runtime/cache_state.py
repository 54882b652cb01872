"""The compressed KV cache as numpy buffers: allocated once, written in place.

Same semantics as edgekv.reference.cache.CompressedKVCache (the oracle): sinks fill
first, then the residual (both fp16, or 8-bit per token); when a residual fills, the
block is quantized (pack.onnx) into ring slot `blocks_pushed % slots`, which once the ring
is full holds the oldest block, so eviction is that overwrite. Counters are host integers
shared by all layers.

The graphs never reorder the cache: the host passes every slot's RoPE position and
validity in storage order [sinks | ring slots | residual] (`cache_positions`,
`cache_valid`) and the new tokens' positions. Those arrays are allocated here too and
rewritten in place, so a backend can bind them once.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from edgekv.meta_u8 import is_u8
from edgekv.policy import CachePolicy, KVShape, packed_prefix, plain_names, plain_rotated, quantized_parts
from edgekv.quant import Quantized, dequantize_values

# Packs one layer's full residual; returns arrays named like pack.onnx's outputs.
PackFn = Callable[[int], Mapping[str, np.ndarray]]

ALIGN = 64  # bytes; TVM accepts a numpy buffer as a zero-copy tensor only at this alignment


def aligned_zeros(shape, dtype) -> np.ndarray:
    """np.zeros whose data starts on an ALIGN-byte boundary (numpy only guarantees 16)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(n + ALIGN, np.uint8)
    off = -raw.ctypes.data % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def new_token_buffers(policy: CachePolicy, shape: KVShape, t: int) -> list[dict[str, np.ndarray]]:
    """Per cache unit (a layer, or with policy.units a layer's heads of one width), the
    buffers a graph with t token slots writes its new K/V into (outputs `new.{unit}.{name}`):
    k and v fp16, or with an 8-bit residual also k_scale, k_zero, ..."""
    return [{s.name: aligned_zeros(s.shape, s.dtype) for side in "kv"
             for s in policy.plain_tensors(side, (1, len(policy.unit_heads(u, shape.num_kv_heads)), t, shape.head_dim))}
            for u in range(policy.num_units)]


def graph_outputs(new: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`new_token_buffers` by graph output name."""
    return {f"new.{i}.{name}": arr for i, parts in enumerate(new) for name, arr in parts.items()}


def plain_float(policy: CachePolicy, arrays: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A sink/residual buffer as float32 [..., T, D]: `arrays` holds `name` (fp16, or 8-bit
    codes with `name`_scale and `name`_zero when policy.residual is "u8", "u8h" or "u8hr";
    "u8hr" codes are of x @ H and are un-rotated here, in float64 as the graphs do)."""
    if policy.residual == "fp16":
        return arrays[name].astype(np.float32)
    codes, d = arrays[name], arrays[name].shape[-1]
    q = Quantized(codes, arrays[f"{name}_scale"], arrays[f"{name}_zero"], None)
    x = dequantize_values(q, 8, policy.residual_group(d), d)
    if plain_rotated(policy.residual):
        from edgekv.rotation import rotate_exact

        x = rotate_exact(x)
    return x


class CacheState:
    def __init__(self, policy: CachePolicy, shape: KVShape,
                 tensors: list[tuple[str, tuple[int, ...], str]], token_counts: tuple[int, ...]) -> None:
        """`tensors`: the manifest's cache buffer list (batch 1); `token_counts`: the T of
        each graph (1 for decode, C for prefill), to size their position inputs."""
        if policy.window is None:
            raise ValueError("the runtime needs a finite window")
        self.policy, self.shape = policy, shape
        self.S, self.B, self.W = policy.sinks, policy.block, policy.window
        self.slots = self.W // self.B
        # The one allocation of the cache: every byte the manifest lists, zeroed.
        self.buffers = {name: aligned_zeros(shp, dt) for name, shp, dt in tensors}
        n = self.S + self.W + self.B
        self.cache_positions = aligned_zeros(n, np.int64)
        self.cache_valid = aligned_zeros(n, np.bool_)
        self.new_positions = {t: aligned_zeros(t, np.int64) for t in token_counts}
        self._tok = np.arange(self.B, dtype=np.int64)
        self.n_sink = self.n_res = self.blocks_pushed = 0
        # pack.onnx packs all H heads of a block. A unit with fewer heads is packed from a
        # copy of its residual with its heads repeated up to H: every head quantizes on its
        # own except "u8s" block metadata, a min/max over the heads, which repeats leave as
        # the unit's own. The first heads of the outputs are then the unit's.
        self._pad = [self._padding(u) for u in range(policy.num_units)]
        self._pack_extra = [self._pack_constants(u) for u in range(policy.num_units)]

    def _padding(self, unit: int) -> np.ndarray | None:
        """Unit heads repeated to the model's H (None: the unit has every head)."""
        n, h = len(self.policy.unit_heads(unit, self.shape.num_kv_heads)), self.shape.num_kv_heads
        return None if n == h else np.arange(h) % n

    def _pack_constants(self, unit: int) -> dict[str, np.ndarray]:
        """pack.onnx's per-unit constant inputs (export.onnx_pack), aligned like every
        buffer here: the key feedback step matrices `f` of the unit's heads (edgekv.key_feedback)
        and its key width and value width and group (read only by a graph that computes
        just the unit's own variant, `pack_selectors`), and a padded unit's residual copy."""
        p, pad = self.policy, self._pad[unit]
        extra = {}
        for name, value in p.pack_variant(unit).items():
            extra[name] = aligned_zeros(1, np.int64)
            extra[name][0] = value
        fb = p.key_feedback
        if fb is not None:
            f = fb.layer(p.unit_layer(unit))[list(p.unit_heads(unit, self.shape.num_kv_heads))]
            f = f if pad is None else f[pad]
            extra["f"] = aligned_zeros(f.shape, np.float32)
            extra["f"][...] = f
        if pad is not None:
            for n in self._residual_names():
                own = self.buffers[f"past.{unit}.residual_{n}"]
                extra[n] = aligned_zeros((own.shape[0], len(pad), *own.shape[2:]), own.dtype)
        return extra

    def _residual_names(self) -> list[str]:
        return [n for side in "kv" for n in plain_names(side, self.policy.residual)]

    def pack_inputs(self, unit: int) -> dict[str, np.ndarray]:
        """Everything pack.onnx may take for a cache unit, by input name: the residual k and v
        (with k_scale ... for an 8-bit residual; for a unit with fewer heads than the model,
        its padded copy, refreshed before each pack), plus its constants; a backend binds the
        names its graph declares."""
        own = {n: self.buffers[f"past.{unit}.residual_{n}"] for n in self._residual_names()}
        return {**own, **self._pack_extra[unit]}

    # ---- sizes and counters (CompressedKVCache semantics) ---------------------------
    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    @property
    def ring_filled(self) -> int:
        return min(self.blocks_pushed, self.slots)

    @property
    def seen(self) -> int:
        """Tokens ever appended (the next token's original position)."""
        return self.n_sink + self.blocks_pushed * self.B + self.n_res

    @property
    def length(self) -> int:
        """Tokens attention sees now."""
        return self.n_sink + self.ring_filled * self.B + self.n_res

    def room(self) -> int:
        """Tokens that can be appended before the next sink->residual or block boundary."""
        return self.S - self.n_sink if self.n_sink < self.S else self.B - self.n_res

    def reset(self) -> None:
        for b in self.buffers.values():
            b.fill(0)
        self.n_sink = self.n_res = self.blocks_pushed = 0

    def rewind(self, seen: int) -> bool:
        """Drop the newest tokens so that `seen` remain, if none of them is in the ring
        (a pushed block cannot be un-quantized). Returns whether it could."""
        if seen > self.seen or seen < 0:
            return False
        if self.n_sink < self.S:
            self.n_sink = seen
            return True
        base = self.S + self.blocks_pushed * self.B
        if seen >= base:
            self.n_res = seen - base
        elif self.blocks_pushed == 0:
            self.n_sink, self.n_res = seen, 0
        else:
            return False
        return True

    # ---- positions ------------------------------------------------------------------
    def prepare(self, t: int) -> None:
        """Fill cache_positions / cache_valid (storage order) and new_positions[t] for a
        graph call with t token slots (trailing slots beyond the real tokens are padding
        and only continue the positions)."""
        s, b, cache_mode = self.S, self.B, self.policy.positions == "cache"
        pos, valid = self.cache_positions, self.cache_valid
        pos.fill(0)
        valid.fill(False)
        pos[:self.n_sink] = np.arange(self.n_sink)
        valid[:self.n_sink] = True
        filled = self.ring_filled
        if filled:
            blocks = np.arange(self.blocks_pushed - filled, self.blocks_pushed)  # oldest first
            at = s + (blocks % self.slots)[:, None] * b + self._tok
            start = self.n_sink + np.arange(filled) * b if cache_mode else s + blocks * b
            pos[at] = start[:, None] + self._tok
            valid[at] = True
        res = s + self.W
        res0 = self.n_sink + filled * b if cache_mode else s + self.blocks_pushed * b
        pos[res:res + self.n_res] = res0 + self._tok[:self.n_res]
        valid[res:res + self.n_res] = True
        new0 = self.length if cache_mode else self.seen
        np.add(np.arange(t, dtype=np.int64), new0, out=self.new_positions[t])

    # ---- writing --------------------------------------------------------------------
    def append(self, new: list[dict[str, np.ndarray]], n: int, pack: PackFn) -> None:
        """Write the first n tokens of each layer's new pre-RoPE K/V (`new_token_buffers`:
        [1,H,T,...] as the sinks/residual store them) into the sinks or the residual
        (n <= room()); if the residual fills, pack it into the ring. Then advance the
        counters."""
        if n > self.room():
            raise ValueError(f"append of {n} tokens crosses a block boundary (room {self.room()})")
        buf = self.buffers
        sinks = self.n_sink < self.S
        lo = self.n_sink if sinks else self.n_res
        part = "sink" if sinks else "residual"
        for i, parts in enumerate(new):
            for name, arr in parts.items():
                buf[f"past.{i}.{part}_{name}"][:, :, lo:lo + n] = arr[:, :, :n]
        if sinks:
            self.n_sink += n
            return
        self.n_res += n
        if self.n_res == self.B:
            for u in range(self.policy.num_units):
                self._store_block(u, pack)
            self.n_res, self.blocks_pushed = 0, self.blocks_pushed + 1

    def _store_block(self, layer: int, pack: PackFn) -> None:
        p, pre, buf, b = self.policy, f"past.{layer}.", self.buffers, self.B
        slot = self.blocks_pushed % self.slots  # the oldest block's slot once the ring is full
        bk, bv = p.bits_k[layer], p.bits_v[layer]
        pad = self._pad[layer]
        if pad is not None:  # the unit's heads repeated to H (see __init__)
            for n in self._residual_names():
                np.take(buf[f"{pre}residual_{n}"], pad, axis=1, out=self._pack_extra[layer][n])
        packed = pack(layer) if bk < 16 or bv < 16 else {}
        if pad is not None:
            h = buf[f"{pre}residual_k"].shape[1]
            packed = {name: arr[:, :h] for name, arr in packed.items()}
        if bk == 16:
            buf[pre + "ring_k"][:, :, slot] = plain_float(p, buf, pre + "residual_k")
        else:
            k = packed_prefix(p, "k", bk)
            for part in quantized_parts(p.meta):
                buf[f"{pre}ring_k_{part}"][:, :, slot] = packed[f"{k}_{part}"]
        toks = slice(slot * b, (slot + 1) * b)
        if bv == 16:
            buf[pre + "ring_v"][:, :, toks] = plain_float(p, buf, pre + "residual_v")
        else:
            v = packed_prefix(p, "v", bv, p.value_group(layer))
            for part in ("codes", "scale", "zero"):
                buf[f"{pre}ring_v_{part}"][:, :, toks] = packed[f"{v}_{part}"]
            if is_u8(p.meta):  # one set per block, so it sits at the block's slot
                buf[f"{pre}ring_v_meta"][:, :, slot] = packed[f"{v}_meta"]
