"""Rewrite a traced graph to read a GGUF's quantized blocks instead of fp32 weights.

Gemm(A, W, transB=1) -> onnxruntime's MatMulNBits (com.microsoft; CPU and CUDA kernels,
4- and 8-bit codes in 32-element blocks along K). MatMulNBits only takes integer zero
points (float ones fall back to a ~20x slower path), so Q4_1's block minimums m are added
exactly with a small fp32 MatMul instead: sum_k a_k (d q_k + m) = [MatMulNBits with zero
point 0] + (block sums of a) @ m, whose matrix is 1/32 of W. accuracy_level 4 quantizes
the activations to int8 per block for the integer dot products, as llama.cpp's CPU path
does (q8 activations); levels 0-3 run the fp32 fallback, 3-80x slower here.

Gather(W, ids) of an 8-bit (Q8_0) embedding reads the same code and scale tensors as the
tied lm_head's MatMulNBits (one copy in weights.bin) and dequantizes only the gathered rows.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekv.export.gguf_weights import BLOCK, QuantBlocks

MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4


def _initializers(name: str, qb: QuantBlocks) -> dict[str, np.ndarray]:
    """The tensors MatMulNBits reads: codes [N, K/32, 32*bits/8], scales [N, K/32], zero
    points (4 bits: two per byte) and, for Q4_1, the minimums as a [K/32, N] matrix."""
    n, k = qb.codes.shape
    blocks = qb.codes.reshape(n, k // BLOCK, BLOCK)
    if qb.bits == 4:  # element 2i in the low nibble, 2i+1 in the high one
        codes = (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)
        zp_byte = qb.offset | (qb.offset << 4)
        zero = np.full((n, (k // BLOCK + 1) // 2), zp_byte, np.uint8)
    else:
        codes, zero = blocks, np.full((n, k // BLOCK), qb.offset, np.uint8)
    out = {f"{name}.codes": np.ascontiguousarray(codes), f"{name}.scales": qb.d,
           f"{name}.zero_points": zero}
    if qb.m is not None:
        out[f"{name}.mins"] = np.ascontiguousarray(qb.m.T)
    return out


def _matmul_nbits(node: onnx.NodeProto, name: str, qb: QuantBlocks) -> list[onnx.NodeProto]:
    a, y = node.input[0], node.output[0]
    n, k = qb.codes.shape
    base = node.name or y
    nbits_out = y if qb.m is None else f"{base}.nbits"
    nodes = [helper.make_node("MatMulNBits", [a, f"{name}.codes", f"{name}.scales", f"{name}.zero_points"],
                              [nbits_out], name=f"{base}.nbits", domain=MS_DOMAIN, K=k, N=n,
                              bits=qb.bits, block_size=BLOCK, accuracy_level=ACCURACY_LEVEL)]
    if qb.m is not None:
        shape = f"{base}.block_shape"
        nodes += [
            helper.make_node("Constant", [], [shape], name=shape,
                             value=numpy_helper.from_array(np.array([0, k // BLOCK, BLOCK], np.int64))),
            helper.make_node("Reshape", [a, shape], [f"{base}.blocks"], name=f"{base}.blocks"),
            helper.make_node("ReduceSum", [f"{base}.blocks", f"{base}.last"], [f"{base}.block_sums"],
                             name=f"{base}.block_sums", keepdims=0),
            helper.make_node("MatMul", [f"{base}.block_sums", f"{name}.mins"], [f"{base}.min_terms"],
                             name=f"{base}.min_terms"),
            helper.make_node("Add", [nbits_out, f"{base}.min_terms"], [y], name=f"{base}.add_mins"),
        ]
        nodes.insert(2, helper.make_node("Constant", [], [f"{base}.last"], name=f"{base}.last",
                                         value=numpy_helper.from_array(np.array([-1], np.int64))))
    return nodes


def _gather_rows(node: onnx.NodeProto, name: str, qb: QuantBlocks) -> list[onnx.NodeProto]:
    """Gather(W, ids) for 8-bit blocks: gather codes [.., K/32, 32] and scales, then
    (codes - offset) * d, reshaped to ids.shape + [K]."""
    ids, y, base = node.input[1], node.output[0], node.name or node.output[0]
    k = qb.codes.shape[1]

    def const(suffix: str, value: np.ndarray) -> tuple[str, onnx.NodeProto]:
        out = f"{base}.{suffix}"
        return out, helper.make_node("Constant", [], [out], name=out, value=numpy_helper.from_array(value))

    offset, c_off = const("offset", np.array(qb.offset, np.float32))
    axis, c_axis = const("axis", np.array([-1], np.int64))
    width, c_width = const("width", np.array([k], np.int64))
    n = lambda op, ins, suffix, **kw: helper.make_node(op, ins, [f"{base}.{suffix}"], name=f"{base}.{suffix}", **kw)  # noqa: E731
    return [
        c_off, c_axis, c_width,
        n("Gather", [f"{name}.codes", ids], "codes", axis=0),
        n("Cast", [f"{base}.codes"], "codes_f", to=TensorProto.FLOAT),
        n("Sub", [f"{base}.codes_f", offset], "centered"),
        n("Gather", [f"{name}.scales", ids], "scales", axis=0),
        n("Unsqueeze", [f"{base}.scales", axis], "scales_b"),
        n("Mul", [f"{base}.centered", f"{base}.scales_b"], "rows"),
        n("Shape", [ids], "ids_shape"),
        n("Concat", [f"{base}.ids_shape", width], "out_shape", axis=0),
        helper.make_node("Reshape", [f"{base}.rows", f"{base}.out_shape"], [y], name=f"{base}.reshape"),
    ]


def use_quantized_weights(model: onnx.ModelProto, blocks: dict[str, QuantBlocks]) -> dict[str, int]:
    """Rewrite `model` in place: every Gemm/Gather whose weight has exact blocks reads them.
    Returns how many weights of each block kind were replaced."""
    counts: dict[str, int] = {}
    used: set[str] = set()
    nodes = []
    for node in model.graph.node:
        w = node.input[1] if len(node.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and w in blocks and len(node.input) == 2 and attrs.get("transB") == 1
                and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0):
            nodes += _matmul_nbits(node, w, blocks[w])
        elif node.op_type == "Gather" and node.input[0] in blocks and blocks[node.input[0]].bits == 8 \
                and attrs.get("axis", 0) == 0:
            w = node.input[0]
            nodes += _gather_rows(node, w, blocks[w])
        else:
            nodes.append(node)
            continue
        used.add(w)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for w in sorted(used):
        counts[blocks[w].kind] = counts.get(blocks[w].kind, 0) + 1
        for init_name, arr in _initializers(w, blocks[w]).items():
            model.graph.initializer.append(numpy_helper.from_array(arr, init_name))
    referenced = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in referenced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if used and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return counts
