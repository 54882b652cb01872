"""TVM pack kernel: bit exact with edgekv.quant / edgekv.packing at every width, from an
fp16 residual and from an 8-bit one (policy.residual "u8", "u8h", "u8hr")."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgekv import quant  # noqa: E402
from edgekv.policy import plain_group  # noqa: E402
from edgekv.rotation import rotate_exact  # noqa: E402
from edgekv.tvm_kernels.build import build_pack  # noqa: E402
from edgekv.tvm_kernels.params import PackParams  # noqa: E402
from edgekv.tvm_kernels.targets import host_target  # noqa: E402


def _block(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, 2, 16, 32)) * 3 + 1).astype(np.float16)
    x[0, 0, :, 5] = 1.5  # a constant key channel and value group: scale 0, codes 0
    x[0, 1, 3, :16] = -2.25
    x[0, 1, :, 7] = np.float16(60000.0)  # large magnitudes: fp16 rounding of scale/zero matters
    return x


def _residual(x: np.ndarray, p: PackParams) -> tuple[list[np.ndarray], np.ndarray]:
    """The residual as stored (kernel inputs) and the fp32 block the reference quantizes:
    with "u8", 8-bit codes + scale/zero per group and their dequantized values
    (edgekv.reference.cache quantizes ring blocks from those)."""
    if p.residual == "fp16":
        return [x], x.astype(np.float32)
    g = plain_group(p.residual, p.group, p.head_dim)
    if p.residual != "u8hr":
        q = quant.quantize_values(x, 8, g)
        return list(q[:3]), quant.dequantize_values(q, 8, g, p.head_dim)
    # "u8hr": the codes are of x @ H; the block is their dequantized values @ H in float64
    q = quant.quantize_values(rotate_exact(x), 8, g)
    return list(q[:3]), rotate_exact(quant.dequantize_values(q, 8, g, p.head_dim))


@pytest.mark.parametrize("residual", ["fp16", "u8", "u8h", "u8hr"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("side", ["k", "v"])
def test_pack_bit_exact(bits, side, residual):
    p = PackParams(heads=2, head_dim=32, block=16, group=16, bits=bits, residual=residual)
    lib = build_pack(p, side, host_target())
    for seed in range(3):
        inputs, x = _residual(_block(seed), p)
        ref = quant.quantize_keys(x, bits) if side == "k" else quant.quantize_values(x, bits, p.group)
        outs = [tvm.runtime.empty(r.shape, str(r.dtype)) for r in ref[:3]]  # fp16 metadata: no meta
        lib["main"](*(tvm.runtime.tensor(a) for a in inputs), *outs)
        for name, got, want in zip(("codes", "scale", "zero"), outs, ref):
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"{name} bits={bits} side={side}")
