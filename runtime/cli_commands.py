"""`edgekv run`, `edgekv chat` and `edgekv plan`: argparse registration + handlers.

edgekv/cli.py wires these in with add_run(sub), add_chat(sub), add_plan(sub); each
handler returns an exit code and raises EdgekvError subclasses for the CLI to print.
Nothing here imports torch: these commands run on a device install.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from edgekv.runtime.planner import parse_size


def _size(s: str) -> int:
    from edgekv.errors import EdgekvError

    try:
        return parse_size(s)
    except EdgekvError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory made by `edgekv export`")
    p.add_argument("--device", default="cpu",
                   help="device profile (see `edgekv plan --help`), 'cpu' or 'cuda'")
    p.add_argument("--budget", type=_size, help="memory budget, e.g. 1.5GiB or 800MB "
                                                 "(default: the device profile's share of its memory)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, help="seed for sampling (same seed, same text)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "ort+tvm", "tvm"],
                   help="auto (default): ort+tvm when the bundle holds compiled kernels for this "
                        "machine and tvm is installed, else ort; ort: onnxruntime; ort+tvm: onnxruntime for the layers and the fused TVM kernel "
                        "for decode attention (needs the tvm extra; `edgekv compile BUNDLE --device host` "
                        "stores the kernels in the bundle); tvm: the whole graphs compiled by Relax")


def _load(args):
    from edgekv.runtime.engine import Engine

    return Engine.load(args.bundle, device=args.device, budget=args.budget, threads=args.threads or None,
                       verify=not args.no_verify, backend=args.backend)


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


# ---- run ----------------------------------------------------------------------------
def add_run(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="generate text from a prompt with a bundle (no torch needed)",
                       description="Load BUNDLE within the memory budget and stream the continuation "
                                   "of PROMPT, then print one line of statistics to stderr.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_args(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    p.set_defaults(func=run_command)
    return p


def run_command(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = _load(args)
    request = [{"role": "user", "content": prompt}] if args.chat else prompt
    gen = engine.generate(request, max_new_tokens=args.max_new_tokens, stop=args.stop or None,
                          ignore_eos=args.ignore_eos, **_sampling(args))
    for piece in gen:
        out.write(piece)
        out.flush()
    out.write("\n")
    print(f"{gen.stats.summary()}, backend {engine.backend.name}", file=err)
    return 0


# ---- chat ---------------------------------------------------------------------------
def add_chat(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="interactive chat with a bundle (streaming, keeps the cache)",
                       description="Chat with the model's chat template. Each turn prefills only the "
                                   "new tokens; the compressed cache keeps the conversation within the "
                                   "budget. Commands: /reset clears the conversation, /exit (or EOF) ends.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_args(p)
    p.add_argument("-n", "--max-new-tokens", type=int, default=512, help="tokens per reply at most")
    p.add_argument("--system", help="system message")
    p.add_argument("--stats", action="store_true", help="print statistics after each reply")
    p.set_defaults(func=chat_command)
    return p


def chat_command(args, inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    engine = _load(args)
    engine.tokenizer.render_chat([{"role": "user", "content": "hi"}])  # no template: fail before the prompt
    interactive = inp.isatty() and out.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"edgekv chat: {engine.plan.source} ({engine.plan.policy.describe()}); /reset, /exit", file=err)
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            engine.reset()
            messages = list(system)
            print("(conversation cleared)", file=err)
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        gen = engine.generate(messages, max_new_tokens=args.max_new_tokens, **_sampling(args))
        for piece in gen:
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.stats:
            print(gen.stats.summary(), file=err)
    return 0


# ---- plan ---------------------------------------------------------------------------
def add_plan(sub) -> argparse.ArgumentParser:
    from edgekv.runtime.devices import list_devices

    p = sub.add_parser("plan", help="what fits a device's memory budget: bits, window, bytes by part",
                       description="Plan the cache for MODEL (a Hugging Face directory: bits as given, "
                                   "the window the budget or --context allows) or BUNDLE (policy fixed "
                                   "at export: checks it fits and reports the largest window that "
                                   "would). Devices: cpu, cuda, " + ", ".join(list_devices()) + ".",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", metavar="MODEL|BUNDLE", help="Hugging Face model directory or bundle directory")
    p.add_argument("--device", default="cpu", help="device profile name, 'cpu' or 'cuda'")
    p.add_argument("--budget", type=_size, help="memory budget (default: the device's share)")
    p.add_argument("--context", type=int, help="tokens the cache must hold without eviction")
    p.add_argument("--bits", type=int, default=3, help="code width for a model directory")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens for a model directory")
    p.add_argument("--block", type=int, default=32, help="block (and prefill chunk) for a model directory")
    p.add_argument("--group", type=int, default=32, help="value group for a model directory")
    p.add_argument("--json", dest="json_out", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=plan_command)
    return p


def plan_command(args, out: TextIO | None = None) -> int:
    from edgekv.runtime.planner import plan

    out = out or sys.stdout
    pl = plan(args.source, device=args.device, budget=args.budget, context=args.context, bits=args.bits,
              sinks=args.sinks, block=args.block, group=args.group)
    if args.json_out:
        out.write(json.dumps(pl.as_dict(), indent=2) + "\n")
    else:
        out.write(pl.describe() + "\n")
    return 0


__all__ = ["add_run", "add_chat", "add_plan", "run_command", "chat_command", "plan_command"]
