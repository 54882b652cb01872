"""Memory budget, planner, device profiles and the run/chat/plan commands."""

import argparse
import io
import json

import pytest

from edgekv.errors import EdgekvError
from edgekv.policy import CachePolicy
from edgekv.runtime import DeviceError, Engine, PlanError, list_devices, load_device, parse_size, plan
from edgekv.runtime import devices as devices_mod
from edgekv.runtime.cli_commands import add_chat, add_plan, add_run
from edgekv.runtime.devices import parse_profile, resolve_device
from edgekv.runtime.ort_backend import available_providers
from edgekv.runtime.planner import ModelDims, memory_parts

try:
    from runtime_helpers import CHAT_TEMPLATE, make_bundle
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import CHAT_TEMPLATE, make_bundle

SMOLLM2_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "hidden_size": 576, "intermediate_size": 1536,
                  "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True}
PROFILES = ["cpu-aarch64", "cpu-x86_64", "h100-80gb", "jetson-agx-orin-64gb", "jetson-orin-nano-8gb",
            "jetson-orin-nx-16gb", "rtx-3060-12gb", "rtx-4090-24gb"]


@pytest.fixture(scope="module")
def bundle(tiny_model, tiny_model_dir, tmp_path_factory):
    policy = CachePolicy.uniform(2, 3, window=64, sinks=4, block=8, group=8)
    return make_bundle(tiny_model, tiny_model_dir, tmp_path_factory.mktemp("rt") / "b", policy,
                       chat_template=CHAT_TEMPLATE)


def _cli(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_run(sub), add_chat(sub), add_plan(sub)
    return p.parse_args(argv)


# ---- budget ---------------------------------------------------------------------------
def test_budget_too_small_names_sizes_and_the_window_that_fits(bundle):
    b = Engine.load(bundle).bundle
    dims = ModelDims.from_manifest(b.model)
    at32 = sum(memory_parts(dims, b.policy.with_(window=32), 8, b.weights_bytes).values())
    with pytest.raises(PlanError) as e:
        Engine.load(bundle, budget=at32)
    msg = str(e.value)
    assert "weights 416.00 KiB" in msg and "kv 10.00 KiB" in msg and "workspace" in msg
    assert "window 32 fits in" in msg and "64 was asked (re-export with --window 32)" in msg
    with pytest.raises(PlanError, match="not even a window of one block"):
        Engine.load(bundle, budget="1MiB")


def test_budget_forms_and_the_plan_on_the_engine(bundle):
    e = Engine.load(bundle, budget="1GiB")
    assert e.memory["budget"] == 1 << 30 and e.memory["kv"] == e.memory["kv_allocated"] == 10240
    assert e.memory["total"] == e.memory["weights"] + e.memory["kv"] + e.memory["workspace"]
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("800MB") == 800_000_000 and parse_size(4096) == 4096
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(PlanError):
            parse_size(bad)


# ---- planner --------------------------------------------------------------------------
def test_plan_for_a_smollm2_sized_config():
    p = plan(SMOLLM2_CONFIG, device="jetson-orin-nano-8gb")
    assert p.parts["weights"] == 538_060_032  # = the SmolLM2 bundle's weights.bin, fp32
    assert p.policy.window == 8128 and p.max_window > 8128  # capped by max_position_embeddings
    assert p.budget == int(0.6 * 8 * 2**30) and p.total <= p.budget
    text = p.describe()
    for part in ("layers 0-29 3:3", "window     8128", "sinks      4", "weights 513.13 MiB", "kv ",
                 "workspace", "max_position_embeddings"):
        assert part in text
    small = plan(SMOLLM2_CONFIG, device="cpu", budget="1GiB")
    assert small.policy.window == small.max_window and small.policy.window % 32 == 0
    assert small.total <= 1 << 30
    bigger = small.policy.with_(window=small.policy.window + 32)
    assert sum(memory_parts(ModelDims.from_hf_config(SMOLLM2_CONFIG), bigger, 32, 538_060_032).values()) > 1 << 30
    ctx = plan(SMOLLM2_CONFIG, device="cpu", budget="1GiB", context=1000, bits=4)
    assert ctx.policy.window == 1024 and set(ctx.policy.bits_k) == {4}
    with pytest.raises(PlanError, match=r"context 100000 needs .* window \d+ fits in 1.00 GiB"):
        plan(SMOLLM2_CONFIG, device="cpu", budget="1GiB", context=100_000)
    with pytest.raises(PlanError, match="weights 513.13 MiB"):
        plan(SMOLLM2_CONFIG, device="cpu", budget="300MB")


def test_plan_from_hf_dir_reads_safetensors(tiny_model, tiny_model_dir):
    p = plan(tiny_model_dir, budget="1GiB", block=8, group=8, context=100)
    assert p.parts["weights"] == 4 * sum(t.numel() for t in tiny_model.parameters())
    assert p.kind == "model" and p.policy.window == 96


def test_plan_from_bundle_manifest(bundle):
    p = plan(bundle, device="cpu", budget="1GiB", context=1000)
    assert p.kind == "bundle" and p.policy.window == 64 and p.policy.bits_k == (3, 3)
    assert any("evicted" in n for n in p.notes)
    assert p.parts["kv"] == json.loads((bundle / "manifest.json").read_text())["cache"]["total_bytes"]


# ---- devices --------------------------------------------------------------------------
def test_all_device_profiles_load_and_validate():
    assert list_devices() == PROFILES
    for name in PROFILES:
        d = load_device(name)
        assert d.name == name and d.default_budget() > 0 and d.total_memory() > 0
        assert d.tvm_target["kind"] in ("cuda", "llvm") and d.ort_providers[-1] == "CPUExecutionProvider"
        assert d.memory_bandwidth_gbs is None or d.memory_bandwidth_gbs > 10
        if name.startswith("jetson"):
            assert d.tvm_target["arch"] == "sm_87" and d.tvm_target["host"]["mtriple"] == "aarch64-linux-gnu"
            assert d.memory_bytes is not None
        if name.startswith("cpu"):
            assert d.memory_bytes is None  # detected at load
    assert resolve_device("cpu").name.startswith("cpu-")
    with pytest.raises(DeviceError, match="unknown device 'pi-zero'; known devices: cpu, cuda, cpu-aarch64"):
        load_device("pi-zero")


def test_adding_a_device_is_adding_a_file(tmp_path, monkeypatch):
    base = json.loads(next(p for p in _profile_files() if p.name == "rtx-3060-12gb.json").read_text())
    (tmp_path / "my-board.json").write_text(json.dumps({**base, "name": "my-board", "budget_share": 0.25}))
    monkeypatch.setattr(devices_mod.resources, "files", lambda pkg: tmp_path)
    assert list_devices() == ["my-board"]
    assert load_device("my-board").default_budget() == int(0.25 * base["memory_bytes"])


def _profile_files():
    from importlib import resources
    return [p for p in resources.files("edgekv.devices").iterdir() if p.name.endswith(".json")]


@pytest.mark.parametrize("change,msg", [
    ({"budget_share": 1.5}, "budget_share must be in"), ({"ort_providers": []}, "ort_providers"),
    ({"memory_bytes": "8GB"}, "'memory_bytes' has the wrong type"), ({"tvm_target": {}}, "needs a 'kind'"),
    ({"description": None}, "'description' has the wrong type"),
])
def test_invalid_profiles_are_rejected(change, msg):
    data = json.loads(next(iter(_profile_files())).read_text())
    with pytest.raises(DeviceError, match=msg):
        parse_profile({**data, **change}, "devices/x.json")
    data.pop("name")
    with pytest.raises(DeviceError, match="missing 'name'"):
        parse_profile(data, "devices/x.json")


def test_gpu_profile_without_cuda_provider(bundle):
    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.warns(RuntimeWarning, match="running on CPUExecutionProvider"):
        e = Engine.load(bundle, device="jetson-orin-nano-8gb", budget="1GiB")
    assert e.backend.active_providers == ["CPUExecutionProvider"]
    with pytest.raises(DeviceError, match="install onnxruntime-gpu"):
        Engine.load(bundle, device="cuda", budget="1GiB")


# ---- commands -------------------------------------------------------------------------
def test_run_command_streams_text_then_stats(bundle, capsys):
    args = _cli(["run", str(bundle), "-p", "Hello", "-n", "12", "--ignore-eos", "--budget", "1GiB"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert len(out.out.strip()) > 0 and "12 tokens (length)" in out.err and "tok/s" in out.err
    seeded = _cli(["run", str(bundle), "-p", "Hello", "-n", "12", "--temperature", "0.9", "--seed", "7"])
    seeded.func(seeded)
    a = capsys.readouterr().out
    seeded.func(seeded)
    assert capsys.readouterr().out == a


def test_chat_command(bundle):
    args = _cli(["chat", str(bundle), "-n", "8", "--stats"])
    out, err = io.StringIO(), io.StringIO()
    inp = io.StringIO("hello\n\n/reset\nhi again\n/exit\nnever read\n")
    assert args.func(args, inp=inp, out=out, err=err) == 0
    replies = out.getvalue().splitlines()
    assert len(replies) == 2
    assert "(conversation cleared)" in err.getvalue() and err.getvalue().count("tok/s") == 2
    eof = _cli(["chat", str(bundle), "-n", "4"])
    assert eof.func(eof, inp=io.StringIO("one turn then EOF\n"), out=io.StringIO(), err=io.StringIO()) == 0


def test_plan_command(bundle, capsys):
    args = _cli(["plan", str(bundle), "--device", "jetson-orin-nano-8gb"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "layers 0-1 3:3" in text and "window     64" in text and "on jetson-orin-nano-8gb" in text
    args = _cli(["plan", str(bundle), "--budget", "1GiB", "--json"])
    args.func(args)
    d = json.loads(capsys.readouterr().out)
    assert d["window"] == 64 and d["bytes"]["total"] == sum(v for k, v in d["bytes"].items() if k != "total")
    args = _cli(["plan", str(bundle), "--budget", "2MiB"])
    with pytest.raises(EdgekvError, match="budget on cpu-"):
        args.func(args)
    with pytest.raises(SystemExit):
        _cli(["plan", str(bundle), "--budget", "lots"])


def test_layer_bits_merges_runs_and_names_value_groups():
    from edgekv.runtime.planner import layer_bits

    p = CachePolicy(bits_k=(2, 3, 3, 3), bits_v=(3, 3, 3, 4), groups_v=(32, 64, 64, 32))
    assert layer_bits(p) == "layer 0 2:3, layers 1-2 3:3 g64, layer 3 3:4"
    assert layer_bits(CachePolicy.uniform(4, 3)) == "layers 0-3 3:3"
