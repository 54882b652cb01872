"""Which nodes of an exported graph onnxruntime's CUDA execution provider has no kernel for.

onnxruntime assigns such nodes to the CPU and copies their inputs and outputs between
host and device on every run, so one unsupported op in the cache unpacking moves the
whole ring across PCIe per step. No GPU is needed to know: a node runs on CUDA when the
provider registers a kernel for its op type and input element types.

`CUDA_KERNELS` lists them for the ops edgekv's graphs use, at opset 18, from onnxruntime's
docs/OperatorKernels.md ("Operators implemented by CUDAExecutionProvider", main branch,
read 2026-12-04). An op absent from the table counts as CPU-only, so an exporter change
that brings in a new op fails the check until the op is looked up and listed.

    python -m edgekv.export.cuda_coverage BUNDLE   # exit 1 if any node would leave CUDA
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto, inliner

_ALL = frozenset({"bfloat16", "bool", "double", "float", "float16", "int16", "int32", "int64",
                  "int8", "uint16", "uint32", "uint64", "uint8"})
_NUMBERS = _ALL - {"bool"}
_FLOATS = frozenset({"double", "float", "float16"})
_WIDE = frozenset({"double", "float", "float16", "int32", "int64", "uint32", "uint64"})
_INDICES = frozenset({"int32", "int64"})

# op type -> {input index: element types the CUDA EP registers for that input}
CUDA_KERNELS: dict[str, dict[int, frozenset[str]]] = {
    **{op: {0: _NUMBERS} for op in ("Add", "Sub", "Mul", "Div")},
    "Mod": {0: _WIDE | {"bfloat16"}},
    "Neg": {0: _FLOATS | {"bfloat16", "int16", "int32", "int64", "int8"}},
    "MatMul": {0: _FLOATS | {"bfloat16"}}, "Gemm": {0: _FLOATS | {"bfloat16"}},
    **{op: {0: _FLOATS | {"bfloat16"}} for op in ("Softmax", "Sigmoid", "Sqrt", "Exp", "Reciprocal")},
    **{op: {0: _FLOATS} for op in ("Floor", "Round", "Cos", "Sin")},
    **{op: {0: _ALL} for op in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split",
                                "Slice", "Identity", "Expand", "Shape", "Cast", "ScatterND")},
    "Gather": {0: _ALL, 1: _INDICES},
    "GatherElements": {0: _ALL, 1: _INDICES},
    "Where": {0: frozenset({"bool"}), 1: _FLOATS | {"bfloat16", "int32", "int64", "uint8"}},
    "Equal": {0: _WIDE | {"bool"}},
    **{op: {0: _WIDE} for op in ("Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Min")},
    "ReduceSum": {0: _FLOATS | {"bfloat16", "int32", "int64"}},
    "ReduceMean": {0: _FLOATS | {"int32"}},
    "ReduceMax": {0: _FLOATS | {"int32", "int64"}},
    "ReduceMin": {0: _FLOATS | {"int32", "int64", "int8", "uint8"}},
    "Clip": {0: _FLOATS | {"int64", "int8", "uint64", "uint8"}},
    "Range": {0: frozenset({"double", "float", "int16", "int32", "int64"})},
    "ConstantOfShape": {0: frozenset({"int64"})},
    "If": {0: frozenset({"bool"})},
    "And": {0: frozenset({"bool"})}, "Or": {0: frozenset({"bool"})}, "Not": {0: frozenset({"bool"})},
    "com.microsoft.MatMulNBits": {0: frozenset({"bfloat16", "float", "float16"}), 1: frozenset({"uint8"})},
}
_NO_KERNEL = {"Constant"}  # folded into initializers before partitioning
_BOOL_OUT = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Not"}


def _dtype(elem_type: int) -> str:
    """onnx's element type name as the kernel table writes it (FLOAT16 -> "float16")."""
    return TensorProto.DataType.Name(elem_type).lower()


class _Types:
    """Element types of every value, propagated node by node in graph order (edgekv's
    graphs are topologically sorted; onnx's shape inference stops at contrib ops)."""

    def __init__(self) -> None:
        self.of: dict[str, str] = {}

    def add_graph_io(self, graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.output):
            if vi.type.tensor_type.elem_type:
                self.of[vi.name] = _dtype(vi.type.tensor_type.elem_type)
        for init in graph.initializer:
            self.of[init.name] = _dtype(init.data_type)

    def outputs(self, node: onnx.NodeProto, branch_outputs: list[str]) -> list[str]:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Cast":
            return [_dtype(attrs["to"].i)]
        if node.op_type == "Constant":
            return [_dtype(attrs["value"].t.data_type)]
        if node.op_type == "Shape":
            return ["int64"]
        if node.op_type in _BOOL_OUT:
            return ["bool"]
        if node.op_type == "Where":
            return [self.of.get(node.input[1], "?")]
        if node.op_type == "If":
            return branch_outputs
        first = self.of.get(node.input[0], "?") if node.input else "?"
        return [first] * len(node.output)


def _kernel_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def _walk(graph: onnx.GraphProto, types: _Types, misses: Counter) -> None:
    types.add_graph_io(graph)
    for node in graph.node:
        branch_outputs: list[str] = []
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _walk(attr.g, types, misses)
                branch_outputs = [types.of.get(o.name, "?") for o in attr.g.output]
        key = _kernel_key(node)
        ins = tuple(types.of.get(i, "?") if i else "-" for i in node.input)
        if key not in _NO_KERNEL:
            allowed = CUDA_KERNELS.get(key)
            if allowed is None or any(i < len(ins) and ins[i] not in ok for i, ok in allowed.items()):
                misses[(key, ins)] += 1
        for name, t in zip(node.output, types.outputs(node, branch_outputs)):
            types.of[name] = t


def cpu_fallbacks(model: onnx.ModelProto) -> Counter:
    """{(op, input element types): node count} for every node of `model` (local functions
    inlined, If branches included) that the CUDA execution provider has no kernel for."""
    misses: Counter = Counter()
    _walk(inliner.inline_local_functions(model).graph, _Types(), misses)
    return misses


def bundle_fallbacks(bundle: str | Path) -> dict[str, Counter]:
    """cpu_fallbacks of each ONNX graph in a bundle folder, by file name."""
    return {p.name: cpu_fallbacks(onnx.load(p, load_external_data=False))
            for p in sorted(Path(bundle).glob("*.onnx"))}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m edgekv.export.cuda_coverage BUNDLE_DIR", file=sys.stderr)
        return 2
    bad = 0
    for graph, misses in bundle_fallbacks(args[0]).items():
        for (op, ins), n in sorted(misses.items()):
            print(f"{graph}: {n} x {op}({', '.join(ins)}) has no CUDA kernel")
            bad += n
        if not misses:
            print(f"{graph}: every node has a CUDA kernel")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
