"""`edgekv profile`: argparse registration and the handler (edgekv/cli.py calls add_profile).

Torch is needed only by `--baseline hf`, and only inside its worker process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgekv.errors import EdgekvError


def add_profile(sub) -> argparse.ArgumentParser:
    from edgekv.cli import _int_list
    from edgekv.runtime.cli_commands import _size

    p = sub.add_parser(
        "profile", help="latency and memory of bundles (and baselines) at several prompt lengths",
        description="Measure, per bundle and prompt length: TTFT, prefill tokens/s, per-token decode "
                    "latency p50/p90/p99, decode tokens/s, peak RSS and KV bytes, each setting in a "
                    "fresh process, with ratios against a baseline measured in the same run. Prompts "
                    "are exact token counts of the shipped Jargon File text; prompts longer than a "
                    "bundle's window stream through eviction (memory stays flat).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundles", nargs="*", metavar="BUNDLE", help="bundle directories made by `edgekv export`")
    p.add_argument("--prompt-lens", type=_int_list, default=[128, 1024], help="prompt lengths in tokens")
    p.add_argument("--gen", type=int, default=128, help="tokens generated after each prompt")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per prompt length (pooled)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed short runs (32-token prompt, 8 tokens) before measuring")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "ort+tvm", "tvm"],
                   help="edgekv runtime backend (see `edgekv run --help`)")
    p.add_argument("--device", default="cpu", help="device profile name, 'cpu' or 'cuda'")
    p.add_argument("--budget", type=_size, help="memory budget (default: the device's share)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads for every setting: onnxruntime intra-op / torch (0: their default)")
    p.add_argument("--baseline", action="append", nargs="+", default=[], metavar="KIND [ARG]",
                   help="baseline measured in the same run (repeatable; put it after the bundles): "
                        "'hf [MODEL]' transformers fp32 (MODEL default: the embedded model), "
                        "'onnx DIR' a standard past-key-values ONNX export on onnxruntime, "
                        "'llamacpp GGUF' llama.cpp via llama-cpp-python")
    p.add_argument("--ops", action="store_true",
                   help="also run once per prompt length with onnxruntime's profiler: top operators")
    p.add_argument("--json", dest="json_out", help="write the results as JSON")
    p.add_argument("--csv", dest="csv_out", help="write one row per setting and prompt length as CSV")
    p.add_argument("--plot", dest="plot_out", help="write decode latency and memory vs context as PNG")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print (and with --plot, plot) two earlier --json results side by side")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    p.set_defaults(func=profile_command)
    return p


def _check(args) -> None:
    if args.compare:
        if args.bundles or args.baseline:
            raise EdgekvError("--compare takes two JSON results and no bundles or baselines")
        return
    if not args.bundles:
        raise EdgekvError("no bundle given: edgekv profile BUNDLE [BUNDLE ...] (or --compare A.json B.json)")
    if not args.prompt_lens or any(n < 1 for n in args.prompt_lens):
        raise EdgekvError(f"--prompt-lens must be positive token counts, got {args.prompt_lens}")
    for flag, v, low in (("--gen", args.gen, 1), ("--repeat", args.repeat, 1), ("--warmup", args.warmup, 0),
                         ("--threads", args.threads, 0)):
        if v < low:
            raise EdgekvError(f"{flag} must be >= {low}, got {v}")


def profile_command(args) -> int:
    from rich.console import Console

    from edgekv.profiling import report

    _check(args)
    if args.plot_out:
        from edgekv.profiling.plots import require_matplotlib

        require_matplotlib()
    console = Console()
    if not console.is_terminal:  # piped or logged: wide enough that rows do not wrap
        console = Console(width=160)
    if args.compare:
        from edgekv.profiling.compare import compare_table, matched

        a, b = (report.read_json(p) for p in args.compare)
        console.print(compare_table(a, b, Path(args.compare[0]).name, Path(args.compare[1]).name))
        if not matched(a, b):
            console.print("the two runs share no (setting, prompt length) pair")
        if args.plot_out:
            from edgekv.profiling.plots import plot

            plot([(f"{Path(args.compare[0]).stem}: ", a), (f"{Path(args.compare[1]).stem}: ", b)], args.plot_out)
            print(f"wrote {args.plot_out}")
        return 0

    from edgekv.profiling.session import run_profile

    doc = run_profile(args)
    report.print_report(doc, console)
    if args.json_out:
        report.write_json(doc, args.json_out)
        print(f"wrote {args.json_out}")
    if args.csv_out:
        report.write_csv(doc, args.csv_out)
        print(f"wrote {args.csv_out}")
    if args.plot_out:
        from edgekv.profiling.plots import plot

        plot([("", doc)], args.plot_out)
        print(f"wrote {args.plot_out}")
    return 0
