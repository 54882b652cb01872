"""`edgekv compile BUNDLE --device host`: the library lands in the bundle, the manifest
lists it with its hash, and the bundle still opens (and fails if the library is damaged).
An 8-bit residual's kernels carry the suffix `_r8` (`_r8h` per head: they take other buffers)."""

import json

import pytest

tvm = pytest.importorskip("tvm")

from edgekv.cli import main  # noqa: E402
from edgekv.policy import CachePolicy  # noqa: E402
from edgekv.runtime import BundleError, open_bundle  # noqa: E402

try:
    from runtime_helpers import make_bundle
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import make_bundle


@pytest.mark.parametrize("residual,r", [("fp16", ""), ("u8", "_r8"), ("u8h", "_r8h"), ("u8hr", "_r8hr")])
def test_compile_adds_library(tiny_model, tiny_model_dir, tmp_path, capsys, residual, r):
    policy = CachePolicy(bits_k=(4, 3), bits_v=(3, 3), window=32, sinks=4, block=8, group=8, residual=residual)
    b = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    assert main(["compile", str(b), "--device", "host"]) == 0
    m = json.loads((b / "manifest.json").read_text())
    entry = m["tvm"]["host"]
    assert entry["library"] == "tvm/host.so" and "tvm/host.so" in m["files"]
    assert entry["target"]["kind"] == "llvm"
    assert set(entry["functions"]) == {n + r for n in ("decode_k4_v3", "decode_k3_v3", "prefill_k4_v3", "prefill_k3_v3",
                                                       "pack_k_b4", "pack_k_b3", "pack_v_b3")}
    open_bundle(b)  # hashes of every file, the library included
    lib = tvm.runtime.load_module(str(b / "tvm/host.so"))
    assert lib.implements_function("decode_k4_v3" + r)
    with open(b / "tvm/host.so", "r+b") as f:
        f.seek(100)
        byte = f.read(1)[0]
        f.seek(100)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(BundleError, match="tvm/host.so"):
        open_bundle(b)


def test_compile_unknown_device_is_a_clear_error(tiny_model, tiny_model_dir, tmp_path, capsys):
    policy = CachePolicy.uniform(2, 3, window=32, sinks=4, block=8, group=8)
    b = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    assert main(["compile", str(b), "--device", "no-such-board"]) == 2
    assert "unknown device 'no-such-board'" in capsys.readouterr().err
