"""The sinks and the residual in the graphs: fp16, or 8 bits per token (policy.residual).

With residual "u8" each sink/residual buffer is three tensors (CachePolicy.plain_tensors):
codes uint8 [1,H,T,D] and an fp16 scale and zero per group of G channels [1,H,T,D/G],
i.e. edgekv.quant.quantize_values at 8 bits with fp16 scale/zero, op for op. New tokens
are quantized in the graph that makes them, so attention reads exactly what the runtime
stores from the graph's outputs. "u8h" groups by the whole head; "u8hr" quantizes x @ H
(H the Hadamard matrix of edgekv.rotation) and reads back dequantized @ H, both multiplied
in float64 as the reference cache does (exact sums: the codes do not depend on T).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgekv.export.onnx_ops import F16, F32, U8, Emitter, _quantize
from edgekv.policy import plain_rotated


def plain_types(residual: str) -> tuple[int, ...]:
    return (F16,) if residual == "fp16" else (U8, F16, F16)


def store_new(e: Emitter, x16: str, residual: str, group: int, head_dim: int, out: list[str]) -> list[str]:
    """New K or V fp16 [1,H,T,D] -> the tensors the runtime writes into the sinks or the
    residual, named `out` (graph outputs)."""
    if residual == "fp16":
        return [e.op("Identity", x16, out=out[0])]
    x = e.op("Cast", x16, to=F32)
    if plain_rotated(residual):
        x = _rotate(e, x, head_dim)
    g = e.op("Reshape", x, e.i64(0, 0, 0, -1, group))
    codes, scale, zero = _quantize(e, g, 4, 8)
    return [e.op("Reshape", codes, e.i64(0, 0, 0, -1), out=out[0]),
            e.op("Identity", scale, out=out[1]), e.op("Identity", zero, out=out[2])]


def read_plain(e: Emitter, names: list[str], residual: str, group: int, head_dim: int,
               keep_rotated: bool = False) -> str:
    """A sink/residual buffer (its tensors `names`) as fp32 [1,H,T,D]; with "u8hr" and
    `keep_rotated`, still in the rotated basis it is stored in (x~, not x~ @ H)."""
    if residual == "fp16":
        return e.op("Cast", names[0], to=F32)
    codes = e.op("Reshape", e.op("Cast", names[0], to=F32), e.i64(0, 0, 0, head_dim // group, group))
    last = e.i64(-1)
    scale, zero = (e.op("Unsqueeze", e.op("Cast", n, to=F32), last) for n in names[1:])
    x = e.op("Reshape", e.op("Add", e.op("Mul", codes, scale), zero), e.i64(0, 0, 0, head_dim))
    return _rotate(e, x, head_dim) if plain_rotated(residual) and not keep_rotated else x


def _rotate(e: Emitter, x: str, head_dim: int) -> str:
    """fp32 x @ H, multiplied in float64 (H is symmetric: the same product rotates and un-rotates)."""
    from edgekv.rotation import hadamard

    h = e.const(hadamard(head_dim).astype(np.float64))
    return e.op("Cast", e.op("MatMul", e.op("Cast", x, to=TensorProto.DOUBLE), h), to=F32)
