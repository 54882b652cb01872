import hashlib
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgekv.cli import main
from edgekv.policy import DEFAULT_META, DEFAULT_RESIDUAL, CachePolicy
from edgekv.reference.model import ReferenceModel

ARGS = ["--bits", "3", "--bits-layout", "uniform", "--window", "64", "--block", "8", "--group", "8", "--prefill-chunk", "8"]


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "bundle"
    assert main(["export", str(tiny_model_dir), "-o", str(out), *ARGS]) == 0
    return out


def test_bundle_files_and_manifest(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["policy"]["bits_k"] == [3, 3]
    assert m["model"]["intermediate_size"] == 128  # the planner sizes MLP activations from it
    names = {p.name for p in bundle.iterdir()}
    assert {"decode.onnx", "prefill.onnx", "pack.onnx", "weights.bin", "tokenizer.json"} <= names
    for name, f in m["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == f["sha256"]
    layers = m["cache"]["layers"]
    assert sum(t["bytes"] for layer in layers for t in layer["tensors"]) == m["cache"]["total_bytes"]
    assert [t["name"] for t in layers[1]["tensors"]][0] == "past.1.sink_k"


def test_decode_graph_from_bundle_matches_reference(bundle, tiny_model):
    """The bundle's graphs load with their shared external weights and compute the model."""
    sess = ort.InferenceSession(str(bundle / "decode.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        dt = {"tensor(int64)": np.int64, "tensor(bool)": np.bool_, "tensor(float16)": np.float16,
              "tensor(uint8)": np.uint8}[i.type]
        feeds[i.name] = np.zeros(i.shape, dt)
    feeds["input_ids"] = np.array([[17]], np.int64)
    logits = sess.run(["logits"], feeds)[0]
    ref = ReferenceModel(tiny_model, CachePolicy.uniform(2, 3, window=64, sinks=4, block=8, group=8,
                                                     meta=DEFAULT_META, residual=DEFAULT_RESIDUAL))
    expect = ref.forward(torch.tensor([[17]]), ref.new_cache())[:, -1:]
    np.testing.assert_allclose(logits, expect.numpy(), atol=1e-4)


def test_fp16_weights_halve_the_weights_file(tiny_model_dir, bundle, tmp_path):
    out = tmp_path / "b16"
    assert main(["export", str(tiny_model_dir), "-o", str(out), *ARGS, "--dtype", "fp16"]) == 0
    assert (out / "weights.bin").stat().st_size < 0.6 * (bundle / "weights.bin").stat().st_size
    ort.InferenceSession(str(out / "prefill.onnx"), providers=["CPUExecutionProvider"])


def test_existing_target_needs_force(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny_model_dir), "-o", str(out), *ARGS]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", str(tiny_model_dir), "-o", str(out), *ARGS, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_failed_export_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import edgekv.export.onnx_graph as g

    def boom(*a, **k):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(g, "build_decoder", boom)
    with pytest.raises(RuntimeError):
        main(["export", str(tiny_model_dir), "-o", str(tmp_path / "b"), *ARGS])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra,msg", [
    (["--bits", "7.5"], "bits for keys must be one of"),
    (["--window", "60"], "multiple of block"),
    (["--prefill-chunk", "3"], "must divide --block"),
    (["--window", "none"], "finite --window"),
    (["--layer-bits", "4:2"], "needs 2 K:V pairs"),
])
def test_bad_options_are_one_clear_line(tiny_model_dir, tmp_path, capsys, extra, msg):
    assert main(["export", str(tiny_model_dir), "-o", str(tmp_path / "b"), *ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_output_path_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["export", str(tiny_model_dir), "-o", str(f), *ARGS]) == 2
    assert "is a file" in capsys.readouterr().err


def test_unknown_model_path(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "b"), *ARGS]) == 2
    assert "does not exist" in capsys.readouterr().err
