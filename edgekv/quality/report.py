"""Terminal side of `edgekv eval`: a progress bar while it runs, a table at the end."""

from __future__ import annotations

import time
from dataclasses import asdict

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from edgekv import __version__


def run_with_progress(args, settings, text: str) -> dict:
    import torch

    from edgekv.export.model_loading import load_model
    from edgekv.quality.evaluate import run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with console.status(f"loading {args.model} ..."):
        loaded = load_model(args.model)
    n_tokens = min(args.max_tokens, len(loaded.tokenizer(text).input_ids))
    n_tokens -= n_tokens % args.sequences
    per_setting = n_tokens + sum(args.passkey_lengths) * len(args.passkey_depths)
    t0 = time.perf_counter()
    with Progress(TextColumn("eval"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("eval", total=per_setting * len(settings))
        rows = run_eval(loaded.model, loaded.tokenizer, settings, text, args.max_tokens,
                        args.sequences, args.passkey_lengths, args.passkey_depths,
                        progress=lambda n: bar.advance(task, n))
    return {"edgekv_version": __version__, "model": loaded.source, "tokens": n_tokens,
            "sequences": args.sequences, "passkey_lengths": args.passkey_lengths,
            "passkey_depths": args.passkey_depths, "seconds": time.perf_counter() - t0,
            "rows": [asdict(r) for r in rows]}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _delta(r: dict) -> str:
    if r["delta_pct"] is None:
        return "-"
    se = r.get("delta_pct_se")
    return f"{r['delta_pct']:+.2f}%" + ("" if se is None else f" ±{se:.2f}")


def eval_table(rows: list[dict], model: str, source: str) -> None:
    t = Table(title=f"edgekv eval: {model}\ntext: {source}")
    for col in ("setting", "ppl", "Δppl", "KL", "passkey", "B/token", "×fp16", "KV MiB", "s"):
        t.add_column(col, justify="right" if col != "setting" else "left")
    for r in rows:
        t.add_row(r["setting"], f"{r['ppl']:.3f}", _delta(r),
                  _fmt(r.get("kl"), ".4f"),
                  _fmt(r["passkey_pct"], ".0f") + ("%" if r["passkey_pct"] is not None else ""),
                  f"{r['kv_bytes_per_token']:.0f}", f"{r['fp16_ratio']:.3f}",
                  f"{r['kv_bytes'] / 2**20:.2f}", f"{r['seconds']:.0f}")
    console = Console()
    if not console.is_terminal:  # piped or logged: wide enough that rows do not wrap
        console = Console(width=140)
    console.print(t)
    console.print("Δppl: vs the fp16 cache with the same window, ± its standard error (batch "
                  "means over 256-token blocks: how much of it is the luck of this text). KL: mean KL divergence of the "
                    "next-token distributions from that fp16 cache's, nats/token (steadier than "
                    "Δppl for close settings). B/token: bytes one more "
                    "window token costs, all layers, scales included. KV MiB: whole cache at "
                    "full window (or at the evaluated length when nothing is evicted).")
