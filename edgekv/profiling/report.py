"""Results of `edgekv profile`: the JSON document, ratios against the reference setting,
the terminal table, and CSV.

Document: {"edgekv_version", "created", "machine", "params", "reference", "settings":
[{"name", "kind", "info", "load_s", ..., "rows": [Measurement as dict]}]}. The reference is
the first baseline when there is one, else the first bundle; every ratio is
setting / reference at the same prompt length (tok/s x > 1 is faster, TTFT x and peak x
< 1 are better).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekv import __version__
from edgekv.errors import EdgekvError

MiB = 2 ** 20
CSV_FIELDS = ["setting", "kind", "prompt_len", "new_tokens", "repeat", "ttft_ms", "prefill_tok_s",
              "decode_ms_p50", "decode_ms_p90", "decode_ms_p99", "decode_tok_s", "peak_rss_bytes",
              "rss_bytes", "kv_bytes", "device_mem_bytes", "ratio_decode_tok_s", "ratio_ttft", "ratio_peak_rss"]


def machine() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def document(settings: list[dict], params: dict, reference: str | None) -> dict:
    return {"edgekv_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(), "params": params, "reference": reference, "settings": settings}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratios(doc: dict) -> dict[tuple[str, int], dict]:
    """{(setting, prompt_len): {decode_tok_s, ttft, peak_rss}} against the reference."""
    ref = next((s for s in doc["settings"] if s["name"] == doc.get("reference")), None)
    ref_rows = {r["prompt_len"]: r for r in ref["rows"]} if ref else {}
    out = {}
    for s in doc["settings"]:
        for r in s["rows"]:
            b = ref_rows.get(r["prompt_len"], {})
            out[(s["name"], r["prompt_len"])] = {
                "decode_tok_s": _ratio(r["decode_tok_s"], b.get("decode_tok_s")),
                "ttft": _ratio(r["ttft_ms"], b.get("ttft_ms")),
                "peak_rss": _ratio(r["peak_rss_bytes"], b.get("peak_rss_bytes"))}
    return out


def _x(v: float | None) -> str:
    return f" ({v:.2f}x)" if v is not None else ""


def table(doc: dict, title: str | None = None) -> Table:
    rat = ratios(doc)
    p = doc["params"]
    t = Table(title=title or f"edgekv profile: {p['gen']} new tokens, {p['repeat']} run(s) each, "
                             f"reference = {doc.get('reference') or '-'}")
    for col in ("setting", "prompt", "TTFT ms", "prefill tok/s", "decode ms p50/p90/p99", "decode tok/s",
                "peak RSS MiB", "KV MiB"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for s in doc["settings"]:
        for r in s["rows"]:
            x = rat[(s["name"], r["prompt_len"])]
            t.add_row(s["name"], str(r["prompt_len"]), f"{r['ttft_ms']:.0f}{_x(x['ttft'])}",
                      f"{r['prefill_tok_s']:.0f}",
                      f"{r['decode_ms_p50']:.1f} / {r['decode_ms_p90']:.1f} / {r['decode_ms_p99']:.1f}",
                      f"{r['decode_tok_s']:.1f}{_x(x['decode_tok_s'])}",
                      f"{r['peak_rss_bytes'] / MiB:.0f}{_x(x['peak_rss'])}",
                      f"{r['kv_bytes'] / MiB:.2f}")
    return t


def ops_table(doc: dict, top: int = 5) -> Table | None:
    t = Table(title="top onnxruntime operators (share of the graph's kernel time, ms per call)")
    for col in ("setting", "prompt", "graph", "operators"):
        t.add_column(col)
    n = 0
    for s in doc["settings"]:
        for r in s["rows"]:
            for graph, ops in (r.get("ops") or {}).items():
                if not ops:  # e.g. pack.onnx before the first block fills
                    continue
                t.add_row(s["name"], str(r["prompt_len"]), graph,
                          ", ".join(f"{o['op']} {o['share'] * 100:.0f}% ({o['ms'] / max(o['calls'], 1):.2f})"
                                    for o in ops[:top]))
                n += 1
    return t if n else None


def print_report(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(table(doc))
    ops = ops_table(doc)
    if ops is not None:
        console.print(ops)
    console.print("TTFT: call -> first token (prefill + first sample). decode: gaps between tokens. "
                  "(x): this setting / the reference at the same prompt length. peak RSS: process "
                  "high-water mark while that prompt length ran, in a fresh process per setting.")


def write_json(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EdgekvError(f"profile result {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgekvError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), list) or "params" not in doc:
        raise EdgekvError(f"{path} is not an `edgekv profile --json` result")
    return doc


def csv_rows(doc: dict) -> list[dict]:
    rat = ratios(doc)
    rows = []
    for s in doc["settings"]:
        for r in s["rows"]:
            x = rat[(s["name"], r["prompt_len"])]
            rows.append({**{k: r.get(k) for k in CSV_FIELDS if k in r}, "setting": s["name"], "kind": s["kind"],
                         "ratio_decode_tok_s": x["decode_tok_s"], "ratio_ttft": x["ttft"],
                         "ratio_peak_rss": x["peak_rss"]})
    return rows


def write_csv(doc: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_rows(doc))
