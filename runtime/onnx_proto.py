"""Read the initializer table of an ONNX model without the onnx package.

The runtime ships without `onnx`; all it needs from a graph file is which initializers
live in weights.bin (name, dtype, shape, offset, length), so it can map weights.bin once
and hand the same memory to every session (decode and prefill share weights). The
protobuf wire format is small enough to walk by hand: ModelProto.graph (7) ->
GraphProto.initializer (5) -> TensorProto {dims 1, data_type 2, name 8,
external_data 13, data_location 14}.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# TensorProto.DataType -> numpy dtype (the types an exported weight can have).
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 9: np.bool_,
           10: np.float16, 11: np.float64}


class ProtoError(ValueError):
    """The bytes are not a well-formed ONNX model (e.g. a truncated file)."""


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    location: str
    offset: int
    length: int


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ProtoError("varint too long")


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) where value is an int or a memoryview."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ProtoError(f"field {field} runs past the end of the data (truncated?)")
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ProtoError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ProtoError("truncated field")
        yield field, wire, value


def _tensor(buf: memoryview) -> ExternalTensor | None:
    dims: list[int] = []
    dtype = location = None
    name, external, ext = "", False, {}
    for field, wire, value in _fields(buf):
        if field == 1:
            if wire == 2:  # packed repeated int64
                j = 0
                while j < len(value):
                    d, j = _varint(value, j)
                    dims.append(d)
            else:
                dims.append(value)
        elif field == 2:
            dtype = value
        elif field == 8:
            name = bytes(value).decode()
        elif field == 13:
            kv = {f: bytes(v).decode() for f, _, v in _fields(value)}
            ext[kv.get(1, "")] = kv.get(2, "")
        elif field == 14:
            external = value == 1
    if not external:
        return None
    if dtype not in _DTYPES:
        raise ProtoError(f"initializer {name} has unsupported data type {dtype}")
    location = ext.get("location", "")
    return ExternalTensor(name, np.dtype(_DTYPES[dtype]), tuple(dims), location,
                          int(ext.get("offset", 0)), int(ext["length"]) if "length" in ext else -1)


def external_initializers(model_bytes: bytes) -> list[ExternalTensor]:
    """Initializers of the main graph whose data lives in an external file."""
    out = []
    graphs = [v for f, w, v in _fields(memoryview(model_bytes)) if f == 7 and w == 2]
    if not graphs:
        raise ProtoError("no graph in the model")
    for field, wire, value in _fields(graphs[0]):
        if field == 5 and wire == 2:
            t = _tensor(value)
            if t is not None:
                out.append(t)
    return out
