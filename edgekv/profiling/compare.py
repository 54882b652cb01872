"""`edgekv profile --compare A.json B.json`: two earlier runs side by side, matched by
setting name and prompt length (ratios are B / A)."""

from __future__ import annotations

from rich.table import Table

from edgekv.profiling.report import MiB


def _rows(doc: dict) -> dict[tuple[str, int], dict]:
    return {(s["name"], r["prompt_len"]): r for s in doc["settings"] for r in s["rows"]}


def _cell(a: float | None, b: float | None, fmt: str) -> str:
    if a is None or b is None:
        return "-" if b is None else format(b, fmt)
    return f"{format(a, fmt)} -> {format(b, fmt)}" + (f" ({b / a:.2f}x)" if a else "")


def compare_table(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> Table:
    ra, rb = _rows(a), _rows(b)
    t = Table(title=f"edgekv profile --compare: {name_a} -> {name_b} (x = B / A)")
    for col in ("setting", "prompt", "TTFT ms", "decode ms p50", "decode tok/s", "peak RSS MiB"):
        t.add_column(col, justify="left" if col == "setting" else "right")
    for key in list(dict.fromkeys([*ra, *rb])):
        x, y = ra.get(key), rb.get(key)
        if x is None or y is None:
            only = name_a if y is None else name_b
            t.add_row(key[0], str(key[1]), f"only in {only}", "", "", "")
            continue
        t.add_row(key[0], str(key[1]), _cell(x["ttft_ms"], y["ttft_ms"], ".0f"),
                  _cell(x["decode_ms_p50"], y["decode_ms_p50"], ".1f"),
                  _cell(x["decode_tok_s"], y["decode_tok_s"], ".1f"),
                  _cell(x["peak_rss_bytes"] / MiB, y["peak_rss_bytes"] / MiB, ".0f"))
    return t


def matched(a: dict, b: dict) -> int:
    """How many (setting, prompt length) pairs the two runs share."""
    return len(set(_rows(a)) & set(_rows(b)))
