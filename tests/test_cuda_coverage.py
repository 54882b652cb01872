"""Every node of every exported graph has a CUDA kernel in onnxruntime (export/cuda_coverage.py),
so the CUDA execution provider runs the cache unpacking on the device. No GPU needed: the
check reads op types and element types against onnxruntime's kernel registry."""

from collections import Counter

import onnx
import pytest
from onnx import TensorProto, helper

from edgekv.export.cuda_coverage import _Types, _walk, bundle_fallbacks, cpu_fallbacks, main
from edgekv.export.onnx_ops import OPSET
from edgekv.export.tiny import tiny_llama
from edgekv.policy import CachePolicy, KVShape
from runtime_helpers import make_bundle
from test_onnx_export import CLIPS, _key_feedback

WIDTHS_K, WIDTHS_V = (1, 2, 3, 4, 5, 6, 8), (8, 6, 5, 4, 3, 2, 16)


def _graph(nodes, inputs, outputs):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", OPSET)])


def test_flags_ops_and_types_without_cuda_kernels():
    u32 = [helper.make_tensor_value_info(n, TensorProto.UINT32, [4]) for n in ("a", "b")]
    out = [helper.make_tensor_value_info("y", TensorProto.UINT32, [4])]
    shift = _graph([helper.make_node("BitShift", ["a", "b"], ["y"], direction="RIGHT")], u32, out)
    assert cpu_fallbacks(shift) == {("BitShift", ("uint32", "uint32")): 1}
    # Mod has CUDA kernels for uint32 but not uint8: the element type decides
    mod32 = _graph([helper.make_node("Mod", ["a", "b"], ["y"])], u32, out)
    assert not cpu_fallbacks(mod32)
    u8 = [helper.make_tensor_value_info(n, TensorProto.UINT8, [4]) for n in ("a", "b")]
    cast = _graph([helper.make_node("Mod", ["a", "b"], ["m"]), helper.make_node("Cast", ["m"], ["y"], to=TensorProto.UINT32)],
                  u8, out)
    assert cpu_fallbacks(cast) == {("Mod", ("uint8", "uint8")): 1}


def test_types_propagate_through_casts_and_if_branches():
    """A BitwiseAnd whose uint64 input comes out of a Cast inside an If branch is found."""
    then = helper.make_graph([helper.make_node("Cast", ["x"], ["w"], to=TensorProto.UINT64),
                              helper.make_node("BitwiseAnd", ["w", "w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.UINT64, [4])])
    other = helper.make_graph([helper.make_node("Cast", ["x"], ["e"], to=TensorProto.UINT64)], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.UINT64, [4])])
    model = _graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT64, [4])])
    assert cpu_fallbacks(model) == {("BitwiseAnd", ("uint64", "uint64")): 1}


@pytest.fixture(scope="module")
def mixed_bundles(tiny_model_dir, tmp_path_factory):
    """Bundles with every code width on both sides, in both metadata formats, rotated,
    clipped and with key feedback (a 7-layer tiny model); the u8 one with 8-bit sinks and
    residual too."""
    model = tiny_llama(num_layers=len(WIDTHS_K))
    shape = KVShape(len(WIDTHS_K), 2, 16)
    out = {}
    for meta in ("fp16", "u8"):
        policy = CachePolicy(bits_k=WIDTHS_K, bits_v=WIDTHS_V, window=32, sinks=4, block=8, group=8, meta=meta,
                             rotation="hadamard", clip=CLIPS, key_feedback=_key_feedback(shape), residual=meta)
        out[meta] = make_bundle(model, tiny_model_dir, tmp_path_factory.mktemp(meta) / "b", policy)
    # widths per KV head (policy.units): head 1 of each layer takes the next layer's widths
    n = len(WIDTHS_K)
    split = CachePolicy.from_heads([(WIDTHS_K[i], WIDTHS_K[(i + 1) % n]) for i in range(n)],
                                   [(WIDTHS_V[i], WIDTHS_V[(i + 1) % n]) for i in range(n)], window=32, sinks=4,
                                   block=8, group=8, meta="u8s", rotation="hadamard", clip=CLIPS,
                                   key_feedback=_key_feedback(shape), residual="u8hr")
    assert split.units
    out["split"] = make_bundle(model, tiny_model_dir, tmp_path_factory.mktemp("split") / "b", split)
    return out


@pytest.mark.parametrize("meta", ["fp16", "u8", "split"])
def test_exported_graphs_run_entirely_on_cuda(mixed_bundles, meta, capsys):
    found = bundle_fallbacks(mixed_bundles[meta])
    assert set(found) == {"decode.onnx", "prefill.onnx", "pack.onnx"}
    assert {g: dict(m) for g, m in found.items() if m} == {}
    assert main([str(mixed_bundles[meta])]) == 0
    assert "every node has a CUDA kernel" in capsys.readouterr().out


def test_propagated_types_agree_with_onnx_inference(mixed_bundles):
    """Where onnx's own shape inference knows a value's type, the checker's agrees."""
    model = onnx.inliner.inline_local_functions(onnx.load(mixed_bundles["u8"] / "decode.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info
             if vi.type.tensor_type.elem_type}
    types = _Types()
    _walk(model.graph, types, Counter())
    assert len(known) > 500
    mismatched = {n: (types.of.get(n), TensorProto.DataType.Name(t)) for n, t in known.items()
                  if types.of.get(n) != TensorProto.DataType.Name(t).lower()}
    assert not mismatched, list(mismatched.items())[:5]


def test_cli_usage_error(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "usage" in capsys.readouterr().err
    assert main([]) == 2
