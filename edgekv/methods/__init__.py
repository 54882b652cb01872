"""Accuracy methods for the quantized ring, measured in the reference backend first.

Each method is one small module: a `RingCodec` (how a ring block is quantized and what
attention reads back) or a cache subclass (which blocks the ring keeps). They run through
`CodecCache`, a reference cache that stores the ring as its dequantized values, so a
method costs one file and bench/methods.py measures them all against the uniform codec at
their true bits per element. Only methods that pay for their bytes move into the bundle
format (the Hadamard rotation did: edgekv.rotation).
"""

from edgekv.methods.base import RingCodec, UniformCodec
from edgekv.methods.codebook import CodebookCodec
from edgekv.methods.outliers import OutlierCodec

CODECS: dict[str, type[RingCodec]] = {c.name: c for c in (UniformCodec, OutlierCodec, CodebookCodec)}

__all__ = ["CODECS", "CodebookCodec", "OutlierCodec", "RingCodec", "UniformCodec"]
