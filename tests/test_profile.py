"""edgekv profile on tiny bundles: measurements are structurally right, outputs round-trip,
plots are PNGs, --compare works, bad input is one clear line. No timing thresholds."""

import csv
import json
import math

import pytest

from edgekv.cli import main
from edgekv.policy import CachePolicy
from edgekv.profiling.report import CSV_FIELDS, read_json
from edgekv.profiling.runner import prompt_ids
from edgekv.runtime import Engine
from edgekv.runtime.profiler import profile_engine, summarize

try:
    from runtime_helpers import make_bundle, run_without_torch
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import make_bundle, run_without_torch

WINDOW = 32
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bundles(tiny_model, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prof")
    out = {}
    for bits in (3, 16):
        policy = CachePolicy.uniform(tiny_model.config.num_hidden_layers, bits, window=WINDOW, sinks=4,
                                     block=8, group=8)
        out[bits] = make_bundle(tiny_model, tiny_model_dir, root / f"b{bits}", policy)
    return out


@pytest.fixture(scope="module")
def onnx_baseline(tiny_model, tmp_path_factory):
    from edgekv.export.baseline_onnx import export_past_kv

    return export_past_kv(tiny_model, tmp_path_factory.mktemp("onnx")).parent


def test_profile_engine_counts_and_percentiles(bundles):
    engine = Engine.load(bundles[3])
    prompts = {5: list(range(10, 15)), 100: [i % 90 for i in range(100)]}  # 100 > window: eviction
    rows = profile_engine(engine, prompts, gen=12, repeat=3, warmup=1)
    assert [r.prompt_len for r in rows] == [5, 100]
    for r in rows:
        assert r.new_tokens == 12 and r.repeat == 3 and len(r.ttft_ms_runs) == 3
        assert 0 < r.decode_ms_p50 <= r.decode_ms_p90 <= r.decode_ms_p99
        assert r.ttft_ms > 0 and r.decode_tok_s > 0 and r.prefill_tok_s > 0
        assert math.isclose(r.prefill_tok_s, r.prompt_len / (r.ttft_ms / 1000))
        assert r.kv_bytes == engine.state.nbytes == engine.bundle.cache_bytes
        assert r.peak_rss_bytes >= r.rss_bytes > 0
    assert engine.state.blocks_pushed * 8 > WINDOW  # the long prompt streamed through eviction


def test_summarize_rejects_uneven_runs():
    from edgekv.errors import EdgekvError

    with pytest.raises(EdgekvError, match="different token counts"):
        summarize(4, 3, [(0.1, [0.01, 0.02], [1, 2, 3]), (0.1, [0.01], [1, 2])], 1, 1, 0)
    m = summarize(4, 3, [(0.2, [0.01, 0.03], [5, 6, 7]), (0.4, [0.02, 0.04], [5, 6, 7])], 10, 5, 7)
    assert m.tokens == [5, 6, 7] and m.new_tokens == 3
    assert m.ttft_ms == pytest.approx(300) and m.decode_tok_s == pytest.approx(4 / 0.1)
    assert m.decode_ms_p50 == pytest.approx(25)


def test_prompt_ids_exact_lengths():
    enc = lambda t: [ord(c) for c in t]  # noqa: E731
    p = prompt_ids(enc, "abcdefghij", [1, 7, 25])
    assert {n: len(v) for n, v in p.items()} == {1: 1, 7: 7, 25: 25}
    assert p[7] == p[25][:7] and p[25][10:20] == p[25][:10]  # short text repeats


def test_cli_profile_json_csv_plot_ops(bundles, tiny_model_dir, onnx_baseline, tmp_path):
    js, cs, png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    assert main(["profile", str(bundles[3]), str(bundles[16]), "--prompt-lens", "6,40", "--gen", "5",
                 "--repeat", "2", "--warmup", "0", "--ops", "--baseline", "hf", str(tiny_model_dir),
                 "--baseline", "onnx", str(onnx_baseline),
                 "--json", str(js), "--csv", str(cs), "--plot", str(png)]) == 0
    doc = read_json(js)
    names = [s["name"] for s in doc["settings"]]
    assert names[0].startswith("hf fp32") and doc["reference"] == names[0]
    onnx_name = f"onnx past-kv {onnx_baseline.name}"
    assert "edgekv 3-bit W32" in names and "edgekv fp16 W32" in names and onnx_name in names
    hf, onnx = doc["settings"][0], doc["settings"][names.index(onnx_name)]
    for a, b in zip(hf["rows"], onnx["rows"]):  # same model, same full fp32 cache: same greedy tokens
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 5
    for s in doc["settings"]:
        assert [r["prompt_len"] for r in s["rows"]] == [6, 40]
        for r in s["rows"]:
            assert r["new_tokens"] == 5 and r["repeat"] == 2  # hf yields as many tokens as edgekv
            assert r["decode_ms_p50"] <= r["decode_ms_p90"] <= r["decode_ms_p99"]
        if s["kind"] == "edgekv":
            ops = s["rows"][1]["ops"]
            assert set(ops) == {"decode", "prefill", "pack"}
            assert ops["decode"] and all(o["calls"] > 0 for o in ops["decode"])
            assert sum(o["share"] for o in ops["decode"]) <= 1.0 + 1e-9
            assert {"Gemm", "MatMul"} & {o["op"] for o in ops["decode"]}  # the projections ran
    # the 16-bit cache holds more bytes than the 3-bit one
    kv = {s["name"]: s["rows"][0]["kv_bytes"] for s in doc["settings"]}
    assert kv["edgekv fp16 W32"] > kv["edgekv 3-bit W32"] > 0
    assert kv[names[0]] > 0

    with open(cs, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_FIELDS and len(rows) == 2 * len(names)
    by_key = {(s["name"], r["prompt_len"]): r for s in doc["settings"] for r in s["rows"]}
    for row in rows:
        r = by_key[(row["setting"], int(row["prompt_len"]))]
        assert float(row["ttft_ms"]) == pytest.approx(r["ttft_ms"])
        assert int(row["peak_rss_bytes"]) == r["peak_rss_bytes"]
        if row["setting"] == names[0]:
            assert float(row["ratio_decode_tok_s"]) == pytest.approx(1.0)
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000

    # --compare: the run against a copy with the 3-bit rows twice as fast
    other = json.loads(js.read_text())
    for s in other["settings"]:
        if s["name"] == "edgekv 3-bit W32":
            for r in s["rows"]:
                r["decode_tok_s"] *= 2
    js2 = tmp_path / "r2.json"
    js2.write_text(json.dumps(other))
    cmp_png = tmp_path / "cmp.png"
    assert main(["profile", "--compare", str(js), str(js2), "--plot", str(cmp_png)]) == 0
    assert cmp_png.read_bytes()[:8] == PNG


def test_compare_table_ratios(capsys, tmp_path):
    def doc(tok_s):
        return {"params": {"gen": 4, "repeat": 1}, "reference": "s", "settings": [
            {"name": "s", "kind": "edgekv", "rows": [
                {"prompt_len": 8, "ttft_ms": 10.0, "decode_ms_p50": 5.0, "decode_tok_s": tok_s,
                 "peak_rss_bytes": 2 ** 20}]}]}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc(10.0)))
    b.write_text(json.dumps(doc(25.0)))
    assert main(["profile", "--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "10.0 -> 25.0 (2.50x)" in out


@pytest.mark.parametrize("args,msg", [
    (["profile", "/no/such/bundle"], "does not exist"),
    (["profile", "{b}", "--device", "no-such-device"], "unknown device"),
    (["profile", "{b}", "--budget", "1KB"], "budget"),
    (["profile", "{b}", "--prompt-lens", "0,8"], "--prompt-lens must be positive"),
    (["profile", "{b}", "--gen", "0"], "--gen must be >= 1"),
    (["profile"], "no bundle given"),
    (["profile", "{b}", "--baseline", "nope"], "unknown baseline"),
    (["profile", "{b}", "--baseline", "onnx", "/no/such/dir"], "does not exist"),
    (["profile", "{b}", "--baseline", "hf", "/no/such/model"], "does not exist"),
    (["profile", "--compare", "/no/a.json", "/no/b.json"], "does not exist"),
    (["profile", "{b}", "--compare", "a.json", "b.json"], "--compare takes two JSON results"),
])
def test_bad_input_is_one_clear_line(bundles, args, msg, capsys):
    args = [a.replace("{b}", str(bundles[3])) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_compare_rejects_a_non_result(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    assert main(["profile", "--compare", str(bad), str(bad)]) == 2
    assert "not an `edgekv profile --json` result" in capsys.readouterr().err


def test_profiler_worker_runs_without_torch(bundles, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"bundle": str(bundles[3]), "prompts": {"9": list(range(20, 29))},
                                "gen": 4, "repeat": 1, "warmup": 0, "ops": True}))
    r = run_without_torch(f"from edgekv.runtime.profiler import profile_bundle, worker_main\n"
                          f"import sys; sys.exit(worker_main(profile_bundle, [{str(spec)!r}]))")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert sum(x.get("progress", 0) for x in lines) == 2 * (9 + 4)  # timed run + --ops run
    result = lines[-1]["result"]
    assert result["rows"][0]["new_tokens"] == 4 and result["rows"][0]["ops"]["decode"]
