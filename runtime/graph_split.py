"""Cut a decode graph at its attention nodes: L+1 onnxruntime graphs with attention between.

decode.onnx is one graph whose L `edgekv` CompressedAttention nodes dequantize the whole
ring in standard ops. The kernel backend runs everything else in onnxruntime (the
matmuls, MatMulNBits included) and attention in the fused TVM kernel, so it needs the
graph in pieces: segment 0 runs up to layer 0's attention, segment i from layer i-1's
attention output to layer i's attention inputs, segment L to the logits.

What crosses a cut becomes an output of the segment that makes it and an input of the
segments that read it (the residual stream, the query, the attention output). Constants
are copied instead, and nodes no output needs (the RoPE tables and mask that only the
attention functions read) are dropped. Initializers stay as they are in the bundle
(external data in weights.bin), so the backend hands every segment the same mapped
weights. Needs `onnx` (the tvm extra), not torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import helper

DOMAIN = "edgekv"


@dataclass
class Segment:
    model: onnx.ModelProto
    inputs: list[str]                  # graph inputs of the bundle or tensors made earlier
    outputs: list[str]
    attention: onnx.NodeProto | None = None  # the attention node this segment feeds (None: last)


@dataclass
class SplitGraph:
    segments: list[Segment] = field(default_factory=list)


def _is_attention(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type.startswith("CompressedAttention")


def split_at_attention(model: onnx.ModelProto) -> SplitGraph:
    """Segments of `model` (a decode graph loaded without external data)."""
    g = model.graph
    cuts = [i for i, n in enumerate(g.node) if _is_attention(n)]
    if not cuts:
        raise ValueError("the graph has no edgekv attention nodes")
    bounds = list(zip([-1] + cuts, cuts + [len(g.node)]))
    pieces = [list(g.node[a + 1:b]) for a, b in bounds]
    attn = [g.node[c] for c in cuts] + [None]
    init = {t.name for t in g.initializer}
    const = {o: n for n in g.node if n.op_type == "Constant" for o in n.output}

    # Each segment's needed outputs: its attention node's query + what the graph outputs.
    final = {o.name for o in g.output}
    wanted: list[set[str]] = []
    for seg, a in zip(pieces, attn):
        made = {o for n in seg for o in n.output}
        want = ({a.input[0]} if a is not None else set()) | (final & made)
        wanted.append(want)

    # Walk segments backwards: what a segment reads from earlier ones must be output there.
    needs: list[list[onnx.NodeProto]] = [[] for _ in pieces]
    produced_in = {o: s for s, seg in enumerate(pieces) for n in seg for o in n.output}
    for s in range(len(pieces) - 1, -1, -1):
        made = {o for n in pieces[s] for o in n.output}
        live, keep = set(wanted[s]), []
        for n in reversed(pieces[s]):
            if any(o in live for o in n.output):
                keep.append(n)
                live.update(x for x in n.input if x)
        keep.reverse()
        outside = [x for x in dict.fromkeys(x for n in keep for x in n.input if x)
                   if x not in made and x not in init]
        for x in outside:
            if x in const:  # copy constants rather than passing them between sessions
                keep.insert(0, const[x])
            elif x in produced_in:
                wanted[produced_in[x]].add(x)
            # else: a graph input, or an attention node's output (the backend feeds both)
        needs[s] = keep

    segments = []
    for s, keep in enumerate(needs):
        made = {o for n in keep for o in n.output}
        ins = [x for x in dict.fromkeys(x for n in keep for x in n.input if x) if x not in made and x not in init]
        outs = sorted(wanted[s], key=lambda x: (x not in final, x))
        segments.append(Segment(_model(model, keep, ins, outs, s), ins, outs, attn[s]))
    return SplitGraph(segments)


def _model(model: onnx.ModelProto, nodes, ins: list[str], outs: list[str], index: int) -> onnx.ModelProto:
    g = model.graph
    declared = {v.name: v for v in list(g.input) + list(g.output)}
    used = {x for n in nodes for x in n.input}
    init = [t for t in g.initializer if t.name in used]
    f32 = onnx.TensorProto.FLOAT
    # Cross-cut tensors of this exporter are fp32 (hidden states, queries, attention
    # outputs); the graph's own inputs/outputs keep their declared types. A wrong guess
    # is caught when onnxruntime loads the segment.
    io = lambda names: [declared[x] if x in declared else helper.make_tensor_value_info(x, f32, None) for x in names]  # noqa: E731
    graph = helper.make_graph(nodes, f"{g.name}_segment{index}", io(ins), io(outs), initializer=init)
    m = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="edgekv")
    m.ir_version = model.ir_version
    return m
