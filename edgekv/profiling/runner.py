"""Run every setting of `edgekv profile` in its own worker process and collect results.

A fresh process per setting keeps peak RSS honest (no shared high-water mark, arena or
torch import between settings) and lets one bundle's crash name itself. Workers speak
the JSON-lines protocol of edgekv.runtime.profiler.worker_main.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgekv.errors import EdgekvError

WORKERS = {"edgekv": "edgekv.runtime.profiler", "hf": "edgekv.profiling.baseline_hf",
           "onnx": "edgekv.profiling.baseline_onnx", "llamacpp": "edgekv.profiling.baseline_llamacpp"}


@dataclass
class Setting:
    """One column of the comparison: a bundle or a baseline, and how to run it."""
    name: str
    kind: str                 # edgekv | hf | onnx | llamacpp
    spec: dict                # worker spec (prompts and run parameters are added by run_setting)
    info: dict = field(default_factory=dict)  # shown in the JSON (source, window, bits, ...)


def prompt_ids(encode: Callable[[str], list[int]], text: str, lengths: list[int]) -> dict[int, list[int]]:
    """Prompts of exact token counts: the first n tokens of `text` (repeated if short)."""
    need = max(lengths)
    ids: list[int] = []
    chars = min(len(text), need * 8)
    while True:  # tokenize only as much text as needed (about 4 characters per token)
        ids = encode(text[:chars])
        if len(ids) > need or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if not ids:
        raise EdgekvError("the prompt text encodes to no tokens")
    while len(ids) < need:
        ids = ids + ids
    return {n: ids[:n] for n in lengths}


def run_setting(setting: Setting, prompts: dict[int, list[int]], params: dict,
                progress: Callable[[int], None] | None = None) -> dict:
    """Run one setting's worker; its result dict (rows etc.) or an EdgekvError."""
    spec = {**setting.spec, **params, "prompts": {str(k): v for k, v in prompts.items()}}
    with tempfile.TemporaryDirectory(prefix="edgekv-profile-") as tmp:
        spec_path, err_path = Path(tmp) / "spec.json", Path(tmp) / "stderr.txt"
        spec_path.write_text(json.dumps(spec))
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", WORKERS[setting.kind], str(spec_path)],
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            result = error = None
            try:
                for line in proc.stdout:  # type: ignore[union-attr]
                    try:
                        msg = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a library printed to stdout
                    if "progress" in msg and progress:
                        progress(int(msg["progress"]))
                    result = msg.get("result", result)
                    error = msg.get("error", error)
                proc.wait()
            except BaseException:
                proc.kill()
                raise
        if error:
            raise EdgekvError(f"{setting.name}: {error}")
        if result is None:
            tail = [ln for ln in err_path.read_text().splitlines() if ln.strip()][-1:]
            raise EdgekvError(f"{setting.name}: the profiling worker failed (exit {proc.returncode})"
                              + (f": {tail[0]}" if tail else ""))
    return result
