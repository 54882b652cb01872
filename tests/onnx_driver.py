"""A small numpy driver for decode.onnx / prefill.onnx / pack.onnx on onnxruntime (CPU).

It owns the cache buffers as numpy arrays (CachePolicy.layer_tensors) and keeps the same
counters and write rules as edgekv.reference.cache.CompressedKVCache: sinks first, then
the residual; a full residual is packed by pack.onnx into ring slot
blocks_pushed % ring_slots (evicting the oldest block). Positions and validity are
computed on the host in storage (slot) order, as the graph contract asks.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from edgekv.export.onnx_graph import build_decoder, cache_inputs
from edgekv.export.onnx_pack import build_pack
from edgekv.meta_u8 import is_u8
from edgekv.policy import CachePolicy, KVShape, packed_prefix, quantized_parts
from edgekv.reference.model import kv_shape
from edgekv.runtime.cache_state import plain_float


def session(model: onnx.ModelProto | str, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def layer_selectors(policy: CachePolicy, layer: int) -> dict[str, np.ndarray]:
    """pack.onnx's selector inputs for `layer` (it computes only the layer's own key width
    and value width/group where a side has several; bind those the graph declares)."""
    return {n: np.array([v], np.int64) for n, v in policy.pack_variant(layer).items()}


class OnnxDriver:
    def __init__(self, decode: ort.InferenceSession, pack: ort.InferenceSession, policy: CachePolicy,
                 shape: KVShape, prefill: ort.InferenceSession | None = None, chunk: int | None = None,
                 context: int | None = None) -> None:
        self.decode, self.pack, self.prefill, self.chunk = decode, pack, prefill, chunk
        self.policy, self.shape = policy, shape
        self.buffers = {n: np.zeros(s, dtype=dt) for n, s, dt in cache_inputs(policy, shape, context)}
        self.slots = policy.ring_capacity(context) // policy.block
        self.n_sink = self.n_res = self.blocks_pushed = 0

    @classmethod
    def from_model(cls, model, policy: CachePolicy, chunk: int | None = None, threads: int = 1,
                   context: int | None = None) -> "OnnxDriver":
        shape = kv_shape(model.config)
        prefill = session(build_decoder(model, policy, chunk, context), threads) if chunk else None
        return cls(session(build_decoder(model, policy, 1, context), threads),
                   session(build_pack(policy, shape), threads), policy, shape, prefill, chunk, context)

    # ---- counters (CompressedKVCache semantics) ------------------------------------------
    @property
    def ring_filled(self) -> int:
        return min(self.blocks_pushed, self.slots)

    def room(self) -> int:
        p = self.policy
        return p.sinks - self.n_sink if self.n_sink < p.sinks else p.block - self.n_res

    def positions(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cache_positions, cache_valid) over S+W+B slots in storage order, and the new
        tokens' positions."""
        p, b, s = self.policy, self.policy.block, self.policy.sinks
        w = self.slots * b
        pos, valid = np.zeros(s + w + b, np.int64), np.zeros(s + w + b, bool)
        cache_mode = p.positions == "cache"
        pos[:self.n_sink], valid[:self.n_sink] = np.arange(self.n_sink), True
        first = self.blocks_pushed - self.ring_filled
        for order, blk in enumerate(range(first, self.blocks_pushed)):
            at = s + (blk % self.slots) * b
            start = self.n_sink + order * b if cache_mode else s + blk * b
            pos[at:at + b], valid[at:at + b] = start + np.arange(b), True
        length = self.n_sink + self.ring_filled * b  # tokens before the residual, as attended
        res0 = length if cache_mode else s + self.blocks_pushed * b
        pos[s + w:s + w + self.n_res], valid[s + w:s + w + self.n_res] = res0 + np.arange(self.n_res), True
        new0 = (length if cache_mode else self.n_sink + self.blocks_pushed * b) + self.n_res
        return pos, valid, new0 + np.arange(t, dtype=np.int64)

    # ---- running -------------------------------------------------------------------------
    def forward(self, ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Feed token ids [T] (any T): a prefill run per full chunk that fits before the
        next boundary, decode runs otherwise. Returns (tokens, last logits [V]) per run."""
        out, start = [], 0
        while start < len(ids):
            n = min(self.room(), len(ids) - start)
            if self.prefill is not None and n >= self.chunk:
                n = self.chunk
            else:
                n = 1
            out.append((n, self._run(self.prefill if n > 1 else self.decode, ids[start:start + n])))
            start += n
        return out

    def _run(self, sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
        t = len(ids)
        pos, valid, new = self.positions(t)
        feeds = {"input_ids": np.asarray(ids, np.int64)[None], "new_positions": new,
                 "cache_positions": pos, "cache_valid": valid, **self.buffers}
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, feeds)))
        for i in range(self.shape.num_layers):
            pre = f"new.{i}."
            self._append(i, {n[len(pre):]: r for n, r in res.items() if n.startswith(pre)})
        self._commit(t)
        return res["logits"][0, -1]

    def _append(self, layer: int, new: dict[str, np.ndarray]) -> None:
        """new: the graph's new.{layer}.* outputs by their short names (k, v[, k_scale ...])."""
        t, p, pre = new["k"].shape[2], self.policy, f"past.{layer}."
        buf = self.buffers
        part, at = ("sink", self.n_sink) if self.n_sink < p.sinks else ("residual", self.n_res)
        for name, arr in new.items():
            buf[f"{pre}{part}_{name}"][:, :, at:at + t] = arr
        if part == "residual" and self.n_res + t == p.block:
            self._push_block(layer)

    def _push_block(self, layer: int) -> None:
        p, pre, buf = self.policy, f"past.{layer}.", self.buffers
        if p.window is None and self.blocks_pushed >= self.slots:
            raise RuntimeError("window-less cache is full (the graphs were sized for a context)")
        slot, b = self.blocks_pushed % self.slots, p.block
        bk, bv = p.bits_k[layer], p.bits_v[layer]
        res = {n[len(pre + "residual_"):]: a for n, a in buf.items() if n.startswith(pre + "residual_")}
        res.update(layer_selectors(p, layer))
        names = [o.name for o in self.pack.get_outputs()]
        packed = dict(zip(names, self.pack.run(None, {i.name: res[i.name] for i in self.pack.get_inputs()})))
        if bk == 16:
            buf[pre + "ring_k"][:, :, slot] = plain_float(p, res, "k")
        else:
            for n in quantized_parts(p.meta):
                buf[f"{pre}ring_k_{n}"][:, :, slot] = packed[f"{packed_prefix(p, 'k', bk)}_{n}"]
        toks = slice(slot * b, (slot + 1) * b)
        if bv == 16:
            buf[pre + "ring_v"][:, :, toks] = plain_float(p, res, "v")
        else:
            for n in ("codes", "scale", "zero"):
                buf[f"{pre}ring_v_{n}"][:, :, toks] = packed[f"{packed_prefix(p, 'v', bv, p.value_group(layer))}_{n}"]
            if is_u8(p.meta):
                buf[f"{pre}ring_v_meta"][:, :, slot] = packed[f"{packed_prefix(p, 'v', bv, p.value_group(layer))}_meta"]

    def _commit(self, t: int) -> None:
        if self.n_sink < self.policy.sinks:
            self.n_sink += t
            return
        self.n_res += t
        if self.n_res == self.policy.block:
            self.n_res, self.blocks_pushed = 0, self.blocks_pushed + 1

    def generate(self, ids: np.ndarray, max_new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
        """Greedy: returns the tokens and the logits each was chosen from."""
        logits = self.forward(ids)[-1][1]
        toks, seen = [], [logits]
        for _ in range(max_new_tokens):
            toks.append(int(logits.argmax()))
            logits = self.forward(np.array([toks[-1]]))[-1][1]
            seen.append(logits)
        return toks, seen[:-1]
