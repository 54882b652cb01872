"""A GGUF's own quantized weight blocks, read exactly, for `--dtype gguf` bundles.

llama.cpp files store most matrices as 32-element blocks: Q4_0 (x = d*(q-8)), Q4_1
(x = d*q + m) and Q8_0 (x = d*q, q signed). transformers dequantizes them to fp32 when it
loads the GGUF, so an fp32 bundle reads 4 bytes per weight where the file had ~0.6: on a
CPU decode is bound by those reads. Here the blocks are read back and matched to the
graph's fp32 initializers, with an exactness check: a block is used only when it
dequantizes to the very same fp32 values the model was traced with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 32  # elements per block in Q4_0, Q4_1 and Q8_0

# GGUF tensor name (after "blk.N.") -> the traced graph's initializer name (after "layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "embed_tokens", "output": "lm_head"}


@dataclass
class QuantBlocks:
    """One [rows, cols] matrix as 32-wide blocks along cols: x = d * (codes - offset) + m."""

    kind: str  # "q4_0" | "q4_1" | "q8_0"
    bits: int
    codes: np.ndarray  # uint8 [rows, cols], unsigned codes
    d: np.ndarray  # float32 [rows, cols / 32]
    m: np.ndarray | None  # float32 [rows, cols / 32] (Q4_1 block minimums) or None
    offset: int  # the code of 0.0: 8 (Q4_0), 0 (Q4_1), 128 (Q8_0)

    def dequantize(self) -> np.ndarray:
        r, c = self.codes.shape
        x = (self.codes.reshape(r, -1, BLOCK).astype(np.float32) - np.float32(self.offset)) * self.d[..., None]
        if self.m is not None:
            x = x + self.m[..., None]
        return x.reshape(r, c)

    def rows(self, index: np.ndarray) -> "QuantBlocks":
        m = None if self.m is None else self.m[index]
        return QuantBlocks(self.kind, self.bits, self.codes[index], self.d[index], m, self.offset)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: element j is the low nibble of byte j, element
    j+16 its high nibble (ggml's layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_blocks(kind: str, raw: np.ndarray, cols: int) -> QuantBlocks:
    """Raw GGUF bytes [rows, row_bytes] of one tensor -> QuantBlocks."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, cols // BLOCK, -1)
    if kind == "q4_0":  # f16 d, 16 bytes of nibbles
        d, codes, m, off, bits = _f16(blocks[..., 0:2]), _nibbles(blocks[..., 2:18]), None, 8, 4
    elif kind == "q4_1":  # f16 d, f16 m, 16 bytes of nibbles
        d, m, codes, off, bits = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]), _nibbles(blocks[..., 4:20]), 0, 4
    elif kind == "q8_0":  # f16 d, 32 signed bytes
        d, m, off, bits = _f16(blocks[..., 0:2]), None, 128, 8
        codes = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        raise ValueError(f"unsupported block type {kind}")
    return QuantBlocks(kind, bits, np.ascontiguousarray(codes.reshape(rows, cols)), d, m, off)


def read_gguf_blocks(path: str | Path) -> dict[str, QuantBlocks]:
    """Every Q4_0 / Q4_1 / Q8_0 matrix of a GGUF file, keyed by the traced graph's
    initializer names (layers.N.self_attn.q_proj.weight, embed_tokens.weight, ...)."""
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.tensor_type.name.lower()
        if kind not in ("q4_0", "q4_1", "q8_0") or len(t.shape) != 2:
            continue
        name = _graph_name(t.name)
        if name is not None:
            out[name] = decode_blocks(kind, np.asarray(t.data), int(t.shape[0]))
    return out


def _graph_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head (interleaved -> halves RoPE);
    transformers undoes it at load. hf[index] = gguf."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def match_exact(blocks: dict[str, QuantBlocks], weights: dict[str, np.ndarray],
                num_heads: int, num_kv_heads: int) -> dict[str, QuantBlocks]:
    """The blocks whose dequantization equals the traced fp32 weight bit for bit, with rows
    in the weight's order. Tensors that do not match exactly are left out (stay fp32)."""
    out = {}
    for name, qb in blocks.items():
        w = weights.get(name)
        if w is None or w.shape != qb.codes.shape:
            continue
        candidates = [qb]
        heads = num_heads if ".q_proj." in name else num_kv_heads if ".k_proj." in name else 0
        if heads:
            inverse = np.empty(w.shape[0], np.int64)
            inverse[_rope_rows(w.shape[0], heads)] = np.arange(w.shape[0])
            candidates.insert(0, qb.rows(inverse))
        for c in candidates:
            if np.array_equal(c.dequantize(), w):
                out[name] = c
                break
    return out
