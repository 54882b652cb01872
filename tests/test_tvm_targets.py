"""TVM libraries per target: the host library round-trips through export/load; aarch64
cross-compiles with Debian's gcc; CUDA source for every supported arch compiles with nvcc.
Toolchain-dependent tests skip where the toolchain is absent."""

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("torch")

from edgekv.policy import CachePolicy, KVShape  # noqa: E402
from edgekv.tvm_kernels.build import build_attention, build_pack, cuda_source, nvcc_fatbin  # noqa: E402
from edgekv.tvm_kernels.library import export  # noqa: E402
from edgekv.tvm_kernels.params import AttnParams, PackParams  # noqa: E402
from edgekv.tvm_kernels.targets import CUDA_ARCHS, cuda_target, device_target, host_target  # noqa: E402
from tvm_cases import kernel_case  # noqa: E402

def test_host_library_roundtrip(tmp_path):
    path = str(tmp_path / "kernels.so")
    one = CachePolicy(bits_k=(4,), bits_v=(3,), sinks=4, window=32, block=16, group=16)
    info = export(one, KVShape(1, 2, 32), 4, 8, host_target(), path)
    assert info["functions"] == ["decode_k4_v3", "pack_k_b4", "pack_v_b3", "prefill_k4_v3"]
    lib = tvm.runtime.load_module(path)
    params, args, ref = kernel_case(one, KVShape(1, 2, 32), 4, 4 + 3 * 16 + 5)
    out = tvm.runtime.empty(ref.shape, "float32")
    lib["decode_k4_v3"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-5, rtol=0)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross gcc")
@pytest.mark.parametrize("device", ["cpu-aarch64", "jetson-orin-nano-8gb"])
def test_aarch64_cross_compile(tmp_path, device):
    path = str(tmp_path / "kernels.so")
    one = CachePolicy(bits_k=(3,), bits_v=(3,), sinks=4, window=32, block=16, group=16)
    info = export(one, KVShape(1, 2, 32), 4, 8, device_target(device), path, device=device)
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    if device.startswith("jetson"):
        assert open(path + ".fatbin", "rb").read(4) == b"\x50\xed\x55\xba"  # fatbin magic
        assert len(info["files"]) == 2


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.parametrize("arch", CUDA_ARCHS)
def test_cuda_kernels_compile_with_nvcc(arch):
    target = cuda_target(arch)
    attn = build_attention(AttnParams(4, 2, 32, 4, 2, 16, 16, 3, 2, 1), target)
    attn_u8 = build_attention(AttnParams(4, 2, 32, 4, 2, 16, 16, 3, 2, 1, rotate=True, meta="u8"), target)
    pack = build_pack(PackParams(2, 32, 16, 16, 3), "k", target)
    # residual "u8hr": the float64 un-rotation reductions must schedule on the GPU too
    attn_r = build_attention(AttnParams(4, 2, 32, 4, 2, 16, 16, 3, 2, 1, rotate=True, meta="u8s", residual="u8hr"), target)
    pack_r = build_pack(PackParams(2, 32, 16, 16, 3, residual="u8hr"), "v", target)
    for lib in (attn, attn_u8, pack, attn_r, pack_r):
        src = cuda_source(lib)
        assert "__global__" in src
        assert nvcc_fatbin(src, target)[:4] == b"\x50\xed\x55\xba"
