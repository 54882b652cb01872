"""--dtype gguf: GGUF blocks read exactly (against gguf-py's own dequantizer), matched to
weights with llama.cpp's q/k row order, and run by onnxruntime's MatMulNBits."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper, numpy_helper

from edgekv.export.gguf_weights import QuantBlocks, _rope_rows, decode_blocks, match_exact
from edgekv.export.quantized_matmul import use_quantized_weights

KINDS = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}


def _gguf_tensor(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Raw GGUF bytes of a random matrix quantized by gguf-py, and gguf-py's dequantization."""
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = quantize(w, KINDS[kind])
    return raw, dequantize(raw, KINDS[kind]).reshape(rows, cols)


@pytest.mark.parametrize("kind", list(KINDS))
def test_decode_blocks_matches_gguf_dequantize_exactly(kind):
    raw, ref = _gguf_tensor(kind, 24, 96)
    qb = decode_blocks(kind, raw, 96)
    assert qb.codes.shape == (24, 96) and qb.d.shape == (24, 3)
    np.testing.assert_array_equal(qb.dequantize(), ref)  # bit for bit


def test_match_exact_finds_llama_cpp_row_order_and_rejects_inexact():
    raw, hf_order = _gguf_tensor("q4_1", 64, 64, seed=1)  # 4 heads of 16 rows
    qb = decode_blocks("q4_1", raw, 64)
    gguf_order = hf_order[_rope_rows(64, 4)]  # what llama.cpp's converter writes
    stored = QuantBlocks(qb.kind, qb.bits, qb.codes[_rope_rows(64, 4)], qb.d[_rope_rows(64, 4)],
                         qb.m[_rope_rows(64, 4)], qb.offset)
    np.testing.assert_array_equal(stored.dequantize(), gguf_order)
    blocks = {"layers.0.self_attn.q_proj.weight": stored, "layers.0.mlp.up_proj.weight": qb,
              "layers.0.mlp.down_proj.weight": qb}
    weights = {"layers.0.self_attn.q_proj.weight": hf_order, "layers.0.mlp.up_proj.weight": hf_order,
               "layers.0.mlp.down_proj.weight": hf_order + np.float32(1e-3)}  # not these blocks
    got = match_exact(blocks, weights, num_heads=4, num_kv_heads=2)
    assert set(got) == {"layers.0.self_attn.q_proj.weight", "layers.0.mlp.up_proj.weight"}
    np.testing.assert_array_equal(got["layers.0.self_attn.q_proj.weight"].dequantize(), hf_order)


def _tied_graph(w: np.ndarray, rows: int) -> onnx.ModelProto:
    """ids -> Gather(W) -> Gemm(., W, transB=1): an embedding tied to the output head."""
    v, k = w.shape
    nodes = [helper.make_node("Gather", ["W", "ids"], ["x"], name="embed"),
             helper.make_node("Reshape", ["x", "shape"], ["x2"], name="flat"),
             helper.make_node("Gemm", ["x2", "W"], ["y"], name="head", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, rows])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, v]),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([rows, k], np.int64), "shape")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("kind", list(KINDS))
def test_rewritten_graph_matches_fp32_weights(kind):
    """Gemm -> MatMulNBits (+ exact Q4_1 minimum term), Gather -> gathered 8-bit rows.
    Tolerances: the gathered rows are exact (2e-7: fp32 rounding of d*q); the matmul
    quantizes activations to int8 per 32-block (accuracy_level 4, like llama.cpp's q8
    activations), which bounds its error by ~1 % of the output's scale."""
    v, k, rows = 96, 64, 3
    raw, w = _gguf_tensor(kind, v, k, seed=2)
    model = _tied_graph(w, rows)
    ids = np.array([[5, 0, 95]], np.int64)
    ref_y, ref_x = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})
    counts = use_quantized_weights(model, {"W": decode_blocks(kind, raw, k)})
    assert counts == {kind: 1}
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" in ops and "Gemm" not in ops
    assert ("W" in {i.name for i in model.graph.initializer}) == (kind != "q8_0")  # 4-bit embeddings stay fp32
    y, x = ort.InferenceSession(model.SerializeToString()).run(None, {"ids": ids})
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=2e-7)
    assert np.abs(y - ref_y).max() <= 0.01 * np.abs(ref_y).max()
    assert (y.argmax(-1) == ref_y.argmax(-1)).all()


def test_export_gguf_refuses_a_hugging_face_directory(tiny_model_dir, tmp_path):
    from edgekv.cli import main

    rc = main(["export", str(tiny_model_dir), "--bits", "4", "--bits-layout", "uniform", "--group", "16",
               "--dtype", "gguf", "-o", str(tmp_path / "b")])
    assert rc == 2 and not (tmp_path / "b").exists()
