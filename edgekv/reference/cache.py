"""The compressed KV cache in PyTorch: preallocated buffers, counters, one write per step.

Layout per layer (batch N, KV heads H, head_dim D), as `CachePolicy.layer_tensors` lists:
sinks [N,H,S,D] and residual [N,H,B,D] in fp16 (or 8-bit codes per token with a scale and
zero per group, policy.residual "u8", or per KV head, "u8h", or per KV head of the
tokens Hadamard-rotated along head_dim, "u8hr"), and a ring of W/B blocks: keys packed per
channel over each block, values packed per token in groups of G (or fp16 at 16 bits).
Keys are stored pre-RoPE; `view` returns them with the positions RoPE must use.

A policy with `units` (widths per KV head) keeps one such cache per unit over the unit's
heads; `append` and `view` take and return a layer's heads in model order, and everything
below them works per unit (a unit is a layer when the policy has no `units`).

Counters are shared by all layers: a forward appends the same tokens to every layer,
then calls `commit`. A block is quantized the moment the residual fills, so attention
always sees the residual in fp16 and the ring quantized, exactly as token-by-token
decoding would.
"""

from __future__ import annotations

import torch

from edgekv.meta_u8 import is_u8
from edgekv.policy import CachePolicy, KVShape, plain_rotated
from edgekv.reference import quant_torch as qt

_TORCH_DTYPES = {"float16": torch.float16, "uint8": torch.uint8}


class CompressedKVCache:
    def __init__(self, policy: CachePolicy, shape: KVShape, batch: int = 1,
                 context: int | None = None) -> None:
        policy.check_shape(shape)
        self.policy, self.shape, self.batch = policy, shape, batch
        # A window-less cache starts at `context` tokens (or one block) and grows.
        self._context = context if policy.window is not None else max(context or 0, policy.sinks + policy.block)
        self.layers = [self._allocate(u) for u in range(policy.num_units)]  # per unit
        # policy.rotation rotates K and V of quantized blocks (edgekv.rotation); bench/rotation.py
        # also sets one side alone through this dict.
        self.rotation: dict[str, torch.Tensor] = {}
        if policy.rotation == "hadamard":
            from edgekv.rotation import hadamard

            h = torch.from_numpy(hadamard(shape.head_dim))
            self.rotation = {"k": h, "v": h}
        # residual "u8hr": sinks/residual are quantized as x @ H and read back as x~ @ H
        self._plain_h = None
        if plain_rotated(policy.residual):
            from edgekv.rotation import hadamard

            self._plain_h = torch.from_numpy(hadamard(shape.head_dim)).double()
        fb = policy.key_feedback  # query-aware key rounding (edgekv.key_feedback)
        self.key_feedback = None if fb is None else torch.from_numpy(fb.matrices.copy())
        self.n_sink = 0
        self.n_res = 0
        self.blocks_pushed = 0

    def _heads(self, unit: int) -> list[int]:
        return list(self.policy.unit_heads(unit, self.shape.num_kv_heads))

    def _allocate(self, layer: int, context: int | None = None) -> dict[str, torch.Tensor]:
        specs = self.policy.layer_tensors(self.shape, layer, context or self._context, self.batch)
        return {t.name: torch.zeros(t.shape, dtype=_TORCH_DTYPES[t.dtype]) for t in specs}

    # ---- sizes and counters ---------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes actually held by the buffers (the test compares it with the policy)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    @property
    def ring_slots(self) -> int:
        return self._slots(0)

    def _slots(self, layer: int) -> int:
        c = self.layers[layer]
        return c["ring_v" if "ring_v" in c else "ring_v_codes"].shape[2] // self.policy.block

    @property
    def ring_filled(self) -> int:
        return min(self.blocks_pushed, self.ring_slots)

    @property
    def seen(self) -> int:
        """Tokens ever appended (the next token's original position)."""
        return self.n_sink + self.blocks_pushed * self.policy.block + self.n_res

    @property
    def length(self) -> int:
        """Tokens attention can see in the cache now."""
        return self.n_sink + self.ring_filled * self.policy.block + self.n_res

    def room(self) -> int:
        """Tokens that can be appended before the next sink->residual or block boundary."""
        if self.n_sink < self.policy.sinks:
            return self.policy.sinks - self.n_sink
        return self.policy.block - self.n_res

    def reset(self) -> None:
        for layer in self.layers:
            for t in layer.values():
                t.zero_()
        self.n_sink = self.n_res = self.blocks_pushed = 0

    # ---- the sinks and the residual (fp16, or 8-bit per token) ------------------------
    def read_back(self, x: torch.Tensor) -> torch.Tensor:
        """New K/V [N,H,T,D] as attention reads them once stored in the sinks or the
        residual: fp16-rounded, and with an 8-bit residual through its codes (`append` must
        then be given the fp16-rounded tensor, which it quantizes to the same codes)."""
        x = x.to(torch.float16).float()
        if self.policy.residual == "fp16":
            return x
        d = x.shape[-1]
        g = self.policy.residual_group(d)
        return self._plain_rotate(qt.dequantize_values(*qt.quantize_values(self._plain_rotate(x), 8, g), 8, g, d))

    def _plain_rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x @ H for "u8hr" (H is symmetric: the same product rotates and un-rotates), in
        float64 rounded to float32: the sums are then exact (at D 16 and 64; nearly always
        at other D), so a token's codes and values do not depend on how many tokens one
        matmul took (chunked prefill == token by token; `read_back` == `plain`)."""
        return x if self._plain_h is None else (x.double() @ self._plain_h).float()

    def plain(self, layer: int, name: str, n: int) -> torch.Tensor:
        """The first n tokens of sink or residual buffer `name` ("sink_k", "residual_v", ...)
        of a layer, float32 [N,H,n,D]."""
        c = self.layers[layer]
        if self.policy.residual == "fp16":
            return c[name][:, :, :n].float()
        return self._plain_rotate(qt.dequantize_values(
            c[name][:, :, :n], c[f"{name}_scale"][:, :, :n], c[f"{name}_zero"][:, :, :n],
            8, self.policy.residual_group(self.shape.head_dim), self.shape.head_dim))

    def _write_plain(self, layer: int, name: str, at: int, x: torch.Tensor) -> None:
        c, t = self.layers[layer], x.shape[2]
        if self.policy.residual == "fp16":
            c[name][:, :, at:at + t] = x.to(torch.float16)
            return
        g = self.policy.residual_group(self.shape.head_dim)
        for suffix, part in zip(("", "_scale", "_zero"), qt.quantize_values(self._plain_rotate(x.to(torch.float16).float()), 8, g)):
            c[f"{name}{suffix}"][:, :, at:at + t] = part

    # ---- reading -----------------------------------------------------------------------
    def _ring_order(self) -> list[int]:
        filled, slots = self.ring_filled, self.ring_slots
        oldest = (self.blocks_pushed - filled) % slots if slots else 0
        return [(oldest + i) % slots for i in range(filled)]

    def cache_positions(self) -> torch.Tensor:
        """RoPE positions of the cached tokens, in the order `view` returns them."""
        if self.policy.positions == "cache":
            return torch.arange(self.length)
        p, b = self.policy, self.policy.block
        first = self.blocks_pushed - self.ring_filled
        ring = [p.sinks + (first + j) * b + torch.arange(b) for j in range(self.ring_filled)]
        res = p.sinks + self.blocks_pushed * b + torch.arange(self.n_res)
        return torch.cat([torch.arange(self.n_sink), *ring, res])

    def new_positions(self, n: int) -> torch.Tensor:
        start = self.length if self.policy.positions == "cache" else self.seen
        return start + torch.arange(n)

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized pre-RoPE keys and values [N,H,L,D] float32 in cache order."""
        units = self.policy.layer_units(layer)
        if len(units) == 1:
            return self._view_unit(units[0])
        parts = [self._view_unit(u) for u in units]
        order = torch.argsort(torch.tensor([h for u in units for h in self._heads(u)]))
        return tuple(torch.cat([part[i] for part in parts], dim=1)[:, order] for i in (0, 1))

    def _view_unit(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, p = self.layers[layer], self.policy
        bk, bv = p.bits_k[layer], p.bits_v[layer]
        order = self._ring_order()
        n, h, d, b = self.batch, len(self._heads(layer)), self.shape.head_dim, p.block
        idx = torch.tensor(order, dtype=torch.long)
        if bk == 16:
            ring_k = c["ring_k"][:, :, idx].float()
        else:
            meta = c["ring_k_meta"][:, :, idx] if "ring_k_meta" in c else None
            ring_k = qt.dequantize_keys(c["ring_k_codes"][:, :, idx], c["ring_k_scale"][:, :, idx],
                                        c["ring_k_zero"][:, :, idx], bk, b, meta)
        ring_k = ring_k.reshape(n, h, len(order) * b, d)
        tok = (idx[:, None] * b + torch.arange(b)).reshape(-1)
        if bv == 16:
            ring_v = c["ring_v"][:, :, tok].float()
        else:
            codes = c["ring_v_codes"][:, :, tok].unflatten(2, (len(order), b))  # [N,H,blocks,B,..]
            meta = c["ring_v_meta"][:, :, idx] if "ring_v_meta" in c else None
            ring_v = qt.dequantize_values(codes, c["ring_v_scale"][:, :, tok].unflatten(2, (len(order), b)),
                                          c["ring_v_zero"][:, :, tok].unflatten(2, (len(order), b)), bv,
                                          p.value_group(layer), d,
                                          meta).flatten(2, 3)
        if "k" in self.rotation and bk != 16:
            ring_k = ring_k @ self.rotation["k"].T
        if "v" in self.rotation and bv != 16:
            ring_v = ring_v @ self.rotation["v"].T
        k = torch.cat([self.plain(layer, "sink_k", self.n_sink), ring_k,
                       self.plain(layer, "residual_k", self.n_res)], dim=2)
        v = torch.cat([self.plain(layer, "sink_v", self.n_sink), ring_v,
                       self.plain(layer, "residual_v", self.n_res)], dim=2)
        return k, v

    # ---- writing -----------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new pre-RoPE K/V [N,H,T,D] (T <= room()) into this layer; quantize and push
        the residual into the ring if it fills. Counters move in `commit`."""
        units = self.policy.layer_units(layer)
        if len(units) == 1:
            return self._append_unit(units[0], k, v)
        for u in units:
            heads = self._heads(u)
            self._append_unit(u, k[:, heads], v[:, heads])

    def _append_unit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        if t > self.room():
            raise ValueError(f"append of {t} tokens crosses a block boundary (room {self.room()})")
        p = self.policy
        part, at = ("sink", self.n_sink) if self.n_sink < p.sinks else ("residual", self.n_res)
        self._write_plain(layer, f"{part}_k", at, k)
        self._write_plain(layer, f"{part}_v", at, v)
        if part == "residual" and self.n_res + t == p.block:
            self._push_block(layer)

    def _push_block(self, layer: int) -> None:
        c, p = self.layers[layer], self.policy
        if p.window is None and self.blocks_pushed >= self._slots(layer):
            self._grow(layer)
            c = self.layers[layer]
        # With a window, a full ring's next slot holds the oldest block: it is evicted.
        slot = self.blocks_pushed % self._slots(layer)
        b = p.block
        bk, bv = p.bits_k[layer], p.bits_v[layer]
        rk, rv = self.plain(layer, "residual_k", b), self.plain(layer, "residual_v", b)
        if "k" in self.rotation and bk != 16:
            rk = rk @ self.rotation["k"]
        if "v" in self.rotation and bv != 16:
            rv = rv @ self.rotation["v"]
        if bk == 16:
            c["ring_k"][:, :, slot] = rk.to(torch.float16)
        else:
            fb = None if self.key_feedback is None else self.key_feedback[p.unit_layer(layer)][self._heads(layer)]
            q = qt.quantize_keys(rk, bk, p.meta, p.clip_ratio("k", bk), fb)
            for part, x in zip(("codes", "scale", "zero", "meta"), q):
                c[f"ring_k_{part}"][:, :, slot] = x
        toks = slice(slot * b, (slot + 1) * b)
        if bv == 16:
            c["ring_v"][:, :, toks] = rv.to(torch.float16)
        else:
            q = qt.quantize_values(rv, bv, p.value_group(layer), p.meta, p.clip_ratio("v", bv))  # one block: its meta is per block
            for part, x in zip(("codes", "scale", "zero"), q):
                c[f"ring_v_{part}"][:, :, toks] = x
            if is_u8(p.meta):
                c["ring_v_meta"][:, :, slot] = q[3]

    def _grow(self, layer: int) -> None:
        """Window-less cache only: double the ring (a reference convenience; a device
        backend sizes it once from the context it is given)."""
        old = self.layers[layer]
        new_ctx = self.policy.sinks + 2 * max(self._slots(layer), 1) * self.policy.block
        new = self._allocate(layer, new_ctx)
        for name, t in old.items():
            if name.startswith("ring"):
                axis = 2
                new[name].narrow(axis, 0, t.shape[axis]).copy_(t)
            else:
                new[name].copy_(t)
        self.layers[layer] = new

    def commit(self, t: int) -> None:
        """Advance the counters after every layer appended the same `t` tokens."""
        if self.n_sink < self.policy.sinks:
            self.n_sink += t
            return
        self.n_res += t
        if self.n_res == self.policy.block:
            self.n_res = 0
            self.blocks_pushed += 1
