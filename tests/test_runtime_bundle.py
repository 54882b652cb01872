"""Opening bundles: every kind of damage is one clear BundleError naming the file."""

import json
import shutil

import pytest

from edgekv.policy import CachePolicy
from edgekv.runtime import BundleError, Engine, open_bundle

try:
    from runtime_helpers import make_bundle, rehash
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import make_bundle, rehash


@pytest.fixture(scope="module")
def pristine(tiny_model, tiny_model_dir, tmp_path_factory):
    policy = CachePolicy.uniform(2, 3, window=64, sinks=4, block=8, group=8)
    return make_bundle(tiny_model, tiny_model_dir, tmp_path_factory.mktemp("rt") / "b", policy)


@pytest.fixture
def bundle(pristine, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(pristine, out)
    return out


def _manifest(b):
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b, m):
    (b / "manifest.json").write_text(json.dumps(m))


def test_pristine_bundle_opens(bundle):
    b = open_bundle(bundle)
    assert b.prefill_chunk == 8 and b.policy.window == 64 and b.weights_bytes > 0
    assert sum(len(layer["tensors"]) for layer in b.manifest["cache"]["layers"]) == len(b.cache_tensors)


def test_manifest_rotation_field(bundle):
    """Bundles written before the rotation field existed open as unrotated; an unknown
    rotation is a clear error."""
    m = _manifest(bundle)
    assert m["policy"]["rotation"] == "none"
    del m["policy"]["rotation"]
    _write_manifest(bundle, m)
    assert open_bundle(bundle).policy.rotation == "none"
    m["policy"]["rotation"] = "givens"
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match="rotation"):
        open_bundle(bundle)


def test_hash_mismatch(bundle):
    data = bytearray((bundle / "weights.bin").read_bytes())
    data[1000] ^= 0xFF
    (bundle / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.bin does not match its sha256"):
        Engine.load(bundle)
    open_bundle(bundle, verify=False)  # sizes still agree: only the hash pass sees it


def test_missing_file(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json is missing"):
        open_bundle(bundle)


def test_truncated_onnx(bundle):
    path = bundle / "decode.onnx"
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(BundleError, match=r"decode\.onnx is \d+ bytes but the manifest says \d+ \(truncated"):
        open_bundle(bundle)
    rehash(bundle, "decode.onnx")  # a manifest written over the truncated file
    with pytest.raises(BundleError, match=r"decode\.onnx is not a valid ONNX model .*truncated"):
        open_bundle(bundle)


@pytest.mark.parametrize("version,hint", [(2, "upgrade edgekv"), (0, "re-export"), (None, "re-export")])
def test_wrong_format_version(bundle, version, hint):
    m = _manifest(bundle)
    m["format_version"] = version
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match=rf"format_version {version!r}.*reads format_version 1; {hint}"):
        open_bundle(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(tmp_path)


def test_manifest_inconsistent_with_policy(bundle):
    m = _manifest(bundle)
    m["cache"]["layers"][0]["tensors"][0]["shape"][2] = 5
    _write_manifest(bundle, m)
    with pytest.raises(BundleError, match="cache tensors do not match"):
        open_bundle(bundle)


def test_weights_pointing_outside_the_file(bundle):
    m = _manifest(bundle)
    size = m["files"]["weights.bin"]["bytes"]
    (bundle / "weights.bin").write_bytes((bundle / "weights.bin").read_bytes()[:size // 2])
    rehash(bundle, "weights.bin")
    with pytest.raises(BundleError, match="points outside weights.bin"):
        open_bundle(bundle)
