"""One `edgekv profile` run: check settings, build the prompts once, run every setting
in its worker under one progress bar, and assemble the result document."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgekv.errors import EdgekvError
from edgekv.profiling import report
from edgekv.profiling.runner import Setting, prompt_ids, run_setting
from edgekv.profiling.settings import baseline_settings, bundle_setting
from edgekv.runtime.profiler import WARMUP_TOKENS


def _unique(settings: list[Setting]) -> None:
    """Two bundles with the same policy get their directory names appended."""
    seen: dict[str, int] = {}
    for s in settings:
        seen[s.name] = seen.get(s.name, 0) + 1
    for s in settings:
        if seen[s.name] > 1 and "bundle" in s.info:
            s.name = f"{s.name} ({s.info['bundle']})"


def run_profile(args) -> dict:
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE, evaluation_text
    from edgekv.runtime.tokenizer import BundleTokenizer

    bundles = [bundle_setting(b, args.device, args.budget) for b in args.bundles]
    _unique(bundles)
    baselines = baseline_settings(args.baseline)
    settings = baselines + bundles
    tok = BundleTokenizer(args.bundles[0])
    prompts = prompt_ids(lambda t: tok.encode(t), evaluation_text(), args.prompt_lens)
    top = max(max(v) for v in prompts.values())
    from edgekv.runtime.bundle import read_manifest

    for s in bundles:
        vocab = int(read_manifest(s.info["bundle"])["model"]["vocab_size"])
        if top >= vocab:
            raise EdgekvError(f"{s.info['bundle']} has a vocabulary of {vocab}, but the prompts were "
                              f"tokenized with {args.bundles[0]}'s tokenizer: profile one model per run")
    params = {"gen": args.gen, "repeat": args.repeat, "warmup": args.warmup, "threads": args.threads or None,
              "device": args.device, "budget": args.budget, "backend": args.backend, "verify": not args.no_verify,
              "ops": args.ops}
    per_run = sum(n + args.gen for n in args.prompt_lens)
    totals = [per_run * args.repeat + args.warmup * sum(WARMUP_TOKENS)
              + (per_run if args.ops and s.kind == "edgekv" else 0) for s in settings]
    results = []
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]profile"), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=sum(totals))
        for s, total in zip(settings, totals):
            bar.update(task, description=s.name)
            done_before = bar.tasks[0].completed
            res = run_setting(s, prompts, params, lambda n: bar.advance(task, n))
            bar.update(task, completed=done_before + total)  # warm-up runs report no tokens
            # An edgekv row names a backend other than onnxruntime (auto picks ort+tvm for
            # compiled bundles).
            backend = res.get("backend", "ort") if s.kind == "edgekv" else "ort"
            name = s.name if backend == "ort" else f"{s.name} {backend}"
            results.append({"name": name, "kind": s.kind, "info": s.info, **res})
    reference = results[0]["name"]  # the first baseline, or else the first bundle
    doc_params = {**params, "prompt_lens": args.prompt_lens, "text": DEFAULT_TEXT_SOURCE}
    return report.document(results, doc_params, reference)
