"""Latency and memory of one bundle at several prompt lengths (torch-free).

    rows = profile_engine(engine, {128: ids128, 1024: ids1024}, gen=128, repeat=3)

Each measurement streams `gen` tokens after a prompt of exact token ids and records a
timestamp per token: TTFT is call -> first token (tokenize excluded: ids are given,
prefill + first sample included), decode latencies are the gaps between consecutive
tokens (one decode step + sampling each). Peak RSS is the process high-water mark,
reset before each prompt length (Linux /proc/self/clear_refs), so a row's peak is what
the loaded model plus that run needed, not what an earlier, longer run left behind.

`python -m edgekv.runtime.profiler SPEC.json` runs one bundle in a fresh process (what
`edgekv profile` does, so bundles never share a high-water mark or an arena) and writes
JSON lines to stdout: {"progress": n} as tokens go through, then {"result": {...}} or
{"error": "message"}. The same line protocol serves the baselines (worker_main).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from edgekv.errors import EdgekvError
from edgekv.runtime.engine import current_rss, peak_rss

Progress = Callable[[int], None]
WARMUP_TOKENS = (32, 8)  # a warm-up run: prompt tokens, new tokens (allocators, thread pools)


@dataclass
class Measurement:
    """One setting at one prompt length; times in ms, pooled over `repeat` runs."""
    prompt_len: int
    gen: int                      # tokens asked for
    new_tokens: int               # tokens produced per run (all runs produce the same count)
    repeat: int
    ttft_ms: float                # median over runs
    prefill_tok_s: float          # prompt_len / TTFT
    decode_ms_p50: float          # per-token decode latency percentiles over all runs' gaps
    decode_ms_p90: float
    decode_ms_p99: float
    decode_tok_s: float           # gaps / their sum
    peak_rss_bytes: int           # high-water mark while this prompt length ran
    rss_bytes: int                # after the last run
    kv_bytes: int                 # cache bytes (allocated for edgekv, held at the end otherwise)
    device_mem_bytes: int | None = None
    ops: dict | None = None       # top onnxruntime operators by graph (--ops)
    ttft_ms_runs: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the first run's tokens (greedy: every run's)


def timed_stream(tokens: Iterable[int], progress: Progress | None = None) -> tuple[float, list[float], list[int]]:
    """Consume a token stream: (TTFT s, decode gaps s, the tokens). The clock starts
    when this is called, so create the stream lazily (a generator) or right before."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    out: list[int] = []
    for tok in tokens:
        stamps.append(time.perf_counter())
        out.append(int(tok))
        if progress:
            progress(1)
    if not stamps:
        return 0.0, [], []
    return stamps[0] - t0, list(np.diff(stamps)), out


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def device_memory() -> int | None:
    """GPU memory in use by this process where NVML is importable (nvidia-ml-py), else None."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        pid, used = os.getpid(), 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used += (p.usedGpuMemory or 0) if p.pid == pid else 0
        return used
    except Exception:  # no driver / no device: not available, not an error
        return None


def summarize(prompt_len: int, gen: int, runs: Sequence[tuple[float, list[float], list[int]]], peak: int,
              rss: int, kv_bytes: int) -> Measurement:
    """A Measurement from timed_stream results of repeated runs."""
    counts = {len(t) for _, _, t in runs}
    if len(counts) != 1:
        raise EdgekvError(f"runs at prompt length {prompt_len} produced different token counts {sorted(counts)}")
    ttfts = [t for t, _, _ in runs]
    gaps = np.array([g for _, gs, _ in runs for g in gs], dtype=np.float64)
    ttft = float(np.median(ttfts))
    p50, p90, p99 = (np.percentile(gaps, [50, 90, 99]) * 1000 if gaps.size else (0.0, 0.0, 0.0))
    return Measurement(
        prompt_len=prompt_len, gen=gen, new_tokens=counts.pop(), repeat=len(runs), ttft_ms=ttft * 1000,
        prefill_tok_s=prompt_len / ttft if ttft > 0 else 0.0,
        decode_ms_p50=float(p50), decode_ms_p90=float(p90), decode_ms_p99=float(p99),
        decode_tok_s=float(gaps.size / gaps.sum()) if gaps.size and gaps.sum() > 0 else 0.0,
        peak_rss_bytes=peak, rss_bytes=rss, kv_bytes=kv_bytes, device_mem_bytes=device_memory(),
        ttft_ms_runs=[t * 1000 for t in ttfts], tokens=list(runs[0][2]))


def measure(run_once: Callable[[Sequence[int], int, Progress | None], tuple[float, list[float], list[int]]],
            prompts: dict[int, list[int]], gen: int, repeat: int, warmup: int,
            kv_bytes: Callable[[], int], progress: Progress | None = None) -> list[Measurement]:
    """The measurement loop every backend shares: warm-up runs, then per prompt length
    reset the high-water mark and time `repeat` runs. run_once(ids, gen, progress)
    returns timed_stream's result for a fresh sequence."""
    if prompts:
        first = next(iter(prompts.values()))
        for _ in range(warmup):
            run_once(first[:WARMUP_TOKENS[0]], WARMUP_TOKENS[1], None)
    rows = []
    for n, ids in prompts.items():
        reset_peak_rss()
        runs = []
        for _ in range(repeat):
            runs.append(run_once(ids, gen, progress))
        # RSS first: a peak read before it can be a page below it (seen in CI).
        rss = current_rss()
        rows.append(summarize(n, gen, runs, peak_rss(), rss, kv_bytes()))
    return rows


# ---- edgekv bundles -----------------------------------------------------------------
def _engine_run(engine) -> Callable:
    def run_once(ids: Sequence[int], gen: int, progress: Progress | None):
        engine.reset()

        def stream() -> Iterator[int]:  # lazily started: the clock includes prefill
            g = engine.generate_tokens(list(ids), gen, ignore_eos=True)
            for i, tok in enumerate(g):
                if i == 0 and progress:
                    progress(len(ids))
                yield tok
        return timed_stream(stream(), progress)
    return run_once


def profile_engine(engine, prompts: dict[int, list[int]], gen: int, repeat: int = 1, warmup: int = 1,
                   progress: Progress | None = None) -> list[Measurement]:
    """Measure a loaded Engine at each prompt length (dict order)."""
    return measure(_engine_run(engine), prompts, gen, repeat, warmup, lambda: engine.state.nbytes, progress)


def top_ops(trace: str | Path, top: int = 10) -> list[dict]:
    """Operators of one onnxruntime profile trace, by total kernel time."""
    events = json.loads(Path(trace).read_text())
    total: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            acc = total.setdefault(op, [0.0, 0])
            acc[0] += e.get("dur", 0)
            acc[1] += 1
    all_us = sum(v[0] for v in total.values()) or 1.0
    rows = sorted(total.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"op": op, "ms": us / 1000, "calls": int(calls), "share": us / all_us} for op, (us, calls) in rows]


def profile_ops(bundle: str, prompts: dict[int, list[int]], gen: int, load_kw: dict,
                progress: Progress | None = None) -> dict[int, dict]:
    """One run per prompt length with onnxruntime's profiler on (a fresh Engine each: a
    session's profiler stops for good at end_profiling): {prompt_len: {graph: top ops}}."""
    from edgekv.runtime.engine import Engine

    out = {}
    with tempfile.TemporaryDirectory(prefix="edgekv-ops-") as tmp:
        for n, ids in prompts.items():
            engine = Engine.load(bundle, profile_prefix=str(Path(tmp) / f"p{n}"), **load_kw)
            _engine_run(engine)(ids, gen, progress)
            traces = engine.backend.end_profiling()
            out[n] = {kind: top_ops(path) for kind, path in traces.items()}
            del engine
    return out


def profile_bundle(spec: dict, progress: Progress | None = None) -> dict:
    """The worker's job for one bundle: spec has bundle, prompts {len: ids}, gen, repeat,
    warmup, device, budget, threads, backend, verify, ops."""
    from edgekv.runtime.engine import Engine

    prompts = {int(k): v for k, v in spec["prompts"].items()}
    load_kw = dict(device=spec.get("device", "cpu"), budget=spec.get("budget"), backend=spec.get("backend", "auto"),
                   threads=spec.get("threads") or None, verify=spec.get("verify", True))
    t0 = time.perf_counter()
    reset_peak_rss()
    engine = Engine.load(spec["bundle"], **load_kw)
    load_s, load_peak = time.perf_counter() - t0, peak_rss()
    rows = profile_engine(engine, prompts, spec["gen"], spec.get("repeat", 1), spec.get("warmup", 1), progress)
    info = {"load_s": load_s, "load_peak_rss_bytes": load_peak, "plan_bytes": engine.plan.total,
            "providers": engine.backend.active_providers, "backend": engine.backend.name}
    del engine
    if spec.get("ops"):
        for row, (n, ops) in zip(rows, profile_ops(spec["bundle"], prompts, spec["gen"], load_kw, progress).items()):
            row.ops = ops
    return {**info, "rows": [asdict(r) for r in rows]}


# ---- worker process -----------------------------------------------------------------
def worker_main(job: Callable[[dict, Progress], dict], argv: list[str] | None = None) -> int:
    """Run job(spec, progress) on the JSON spec file argv[0]; JSON lines on stdout."""
    argv = sys.argv[1:] if argv is None else argv
    out = sys.stdout

    def emit(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        spec = json.loads(Path(argv[0]).read_text())
        emit({"result": job(spec, lambda n: emit({"progress": n}))})
        return 0
    except EdgekvError as e:
        emit({"error": str(e)})
        return 2
    except MemoryError:
        emit({"error": "out of memory"})
        return 2


if __name__ == "__main__":
    sys.exit(worker_main(profile_bundle))
