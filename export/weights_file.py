"""Weights as ONNX external data, shared by every graph of a bundle.

decode.onnx and prefill.onnx hold the same weights; writing them once to `weights.bin`
and pointing both graphs' initializers at the same offsets halves the bundle. Optionally
the weights are stored in fp16 and cast to fp32 inside the graph (half the bytes on disk;
onnxruntime folds the casts at session start).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WEIGHTS_FILE = "weights.bin"
ALIGN = 64  # keeps every tensor mmap-aligned for the runtime
MIN_EXTERNAL_BYTES = 1024  # small constants stay inside the graph


def store_weights_fp16(model: onnx.ModelProto) -> None:
    """Rewrite large fp32 initializers as fp16 + an in-graph Cast back to fp32."""
    casts = []
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and _nbytes(init) >= MIN_EXTERNAL_BYTES:
            arr = numpy_helper.to_array(init).astype(np.float16)
            name = init.name
            init.CopyFrom(numpy_helper.from_array(arr, name + ".fp16"))
            casts.append(helper.make_node("Cast", [name + ".fp16"], [name], to=TensorProto.FLOAT,
                                          name=name + ".cast"))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)


def _nbytes(t: TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes


def externalize(models: list[onnx.ModelProto], directory: Path) -> int:
    """Move large initializers of all `models` into one shared weights file in `directory`.
    Initializers with the same name must hold the same bytes (checked). Returns file size."""
    offsets: dict[str, tuple[int, int, str]] = {}
    path = directory / WEIGHTS_FILE
    with open(path, "wb") as f:
        for model in models:
            for init in model.graph.initializer:
                if _nbytes(init) < MIN_EXTERNAL_BYTES:
                    continue
                data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
                digest = hashlib.sha1(data).hexdigest()
                if init.name in offsets:
                    if offsets[init.name][2] != digest:
                        raise ValueError(f"initializer {init.name} differs between graphs")
                else:
                    pad = (-f.tell()) % ALIGN
                    f.write(b"\0" * pad)
                    offsets[init.name] = (f.tell(), len(data), digest)
                    f.write(data)
                off, length, _ = offsets[init.name]
                _point_at(init, off, length)
        size = f.tell()
    return size


def _point_at(init: TensorProto, offset: int, length: int) -> None:
    init.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(field)
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = k, v
