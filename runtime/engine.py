"""Engine: load a bundle under a memory budget, then stream generated text.

    engine = Engine.load("bundle/", device="jetson-orin-nano-8gb", budget="2GiB")
    for piece in engine.generate("Hello", max_new_tokens=64):
        print(piece, end="")
    print(engine.last_stats.summary())

Everything is allocated in `load`: the plan is checked against the budget first, then
CacheState allocates the cache and the backend its graph I/O. Generation only rewrites
those buffers. A prompt of any length streams through the cache (chunked prefill;
eviction once the ring is full), so memory does not grow with tokens.

Multi-turn chat: pass the whole conversation (a list of messages) each turn. The engine
remembers which tokens its cache holds; when the new conversation starts with them,
only the new turn's tokens are prefilled.
"""

from __future__ import annotations

import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np

from edgekv.errors import EdgekvError
from edgekv.runtime.bundle import Bundle, open_bundle
from edgekv.runtime.cache_state import CacheState
from edgekv.runtime.devices import DeviceError, DeviceProfile, resolve_device
from edgekv.runtime.planner import Plan, PlanError, fmt_bytes, parse_size, plan
from edgekv.runtime.sampler import Sampler
from edgekv.runtime.tokenizer import BundleTokenizer

if TYPE_CHECKING:  # onnxruntime is imported when an engine is loaded, not with the package
    from edgekv.runtime.ort_backend import OrtBackend

PAD_MIN = 2  # from this many tokens before a boundary, one padded prefill beats decode steps
# Resident bytes a backend adds beyond the plan's onnxruntime figure: ort+tvm loads the TVM
# runtime and compiler libraries and onnx (measured +170-240 MiB peak RSS on SmolLM2).
BACKEND_RSS = {"ort+tvm": 256 << 20}
T = TypeVar("T")


class EngineError(EdgekvError):
    """A request the engine cannot serve (bad prompt, unknown backend)."""


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss() -> int:
    """Peak RSS of this process image. VmHWM, not getrusage: Linux carries ru_maxrss over
    from the parent across fork + exec, so a child of a big process would report the
    parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class GenerationStats:
    prompt_tokens: int = 0   # tokens of the (rendered) prompt
    prefill_tokens: int = 0  # of those, fed through the model in this call
    reused_tokens: int = 0   # of those, already in the cache from the previous turn
    new_tokens: int = 0      # tokens sampled (an end-of-sequence token included)
    ttft_s: float = 0.0      # call -> first token chosen (tokenize + prefill + sample)
    decode_s: float = 0.0    # first token -> last token
    total_s: float = 0.0
    kv_bytes: int = 0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0
    stop_reason: str = ""    # eos | length | stop | closed
    _t0: float = field(default=0.0, repr=False)

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput after the first token."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.new_tokens} tokens ({self.stop_reason}), prompt {self.prompt_tokens} "
                f"(prefilled {self.prefill_tokens}), TTFT {self.ttft_s * 1000:.0f} ms, "
                f"{self.tokens_per_s:.1f} tok/s, KV {fmt_bytes(self.kv_bytes)}, "
                f"peak RSS {fmt_bytes(self.peak_rss_bytes)}")


class Generation(Generic[T]):
    """An iterator over generated pieces; `stats` is complete once it is exhausted."""

    def __init__(self, it: Iterator[T], stats: GenerationStats, done: Callable[["Generation"], None]) -> None:
        self._it, self.stats, self._done, self.finished = it, stats, done, False

    def __iter__(self) -> "Generation[T]":
        return self

    def __next__(self) -> T:
        if self.finished:
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._finish()
            raise

    def close(self) -> None:
        """Stop early (the engine stays usable)."""
        if not self.finished:
            self._it.close()
            self.stats.stop_reason = "closed"
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        s = self.stats
        s.total_s = time.perf_counter() - s._t0
        s.rss_bytes, s.peak_rss_bytes = current_rss(), peak_rss()
        self._done(self)


class _StopStrings:
    """Cuts the text at the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops, self.pending = [s for s in stops if s], ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    def __init__(self, bundle: Bundle, backend: "OrtBackend", state: CacheState, tokenizer: BundleTokenizer,
                 plan: Plan, device: DeviceProfile) -> None:
        self.bundle, self.backend, self.state = bundle, backend, state
        self.tokenizer, self.plan, self.device = tokenizer, plan, device
        self.chunk = bundle.prefill_chunk
        self.last_stats: GenerationStats | None = None
        self._history: list[int] | None = []  # tokens in the cache (None: unknown, e.g. after a raw prompt)
        self._active: Generation | None = None

    @classmethod
    def load(cls, bundle: str | Path, device: str | DeviceProfile = "cpu", budget: str | int | None = None,
             backend: str = "auto", threads: int | None = None, verify: bool = True,
             profile_prefix: str | None = None) -> "Engine":
        """Open and verify `bundle`, check it fits `budget` (default: the device's share of
        its memory) and allocate everything. Raises an EdgekvError subclass if not.
        backend "auto": 'ort+tvm' when it can start at once (see `_auto_backend`), else 'ort'.
        profile_prefix turns on onnxruntime's per-node profiler (traces written there)."""
        auto = backend == "auto"
        if backend not in BACKENDS and not auto:
            raise EngineError(f"backend {backend!r} is not available; this runtime has "
                              f"{', '.join(repr(k) for k in BACKENDS)}")
        if profile_prefix is not None and backend not in ("ort", "auto"):
            raise EngineError(f"profile_prefix is onnxruntime's profiler; backend {backend!r} has none")
        b = open_bundle(bundle, verify=verify)
        dev = resolve_device(device)
        budget_b = parse_size(budget) if budget is not None else dev.default_budget()
        the_plan = plan(b.manifest, dev, budget_b)
        if auto:
            backend = _auto_backend(b, dev, profile_prefix)
            if the_plan.total + BACKEND_RSS.get(backend, 0) > budget_b:
                backend = "ort"  # the faster backend does not fit; the plain one may
        extra = BACKEND_RSS.get(backend, 0)
        if extra:
            the_plan.parts["backend"] = extra
            if the_plan.total > budget_b:
                raise PlanError(f"backend {backend!r} needs {fmt_bytes(extra)} of its own; with it the plan "
                                f"is {fmt_bytes(the_plan.total)}, over the budget of {fmt_bytes(budget_b)} "
                                f"(use backend 'ort', or a larger budget)")
        state = CacheState(b.policy, b.shape, b.cache_tensors, (1, b.prefill_chunk))
        be = BACKENDS[backend](b, state, dev, device == "cuda", threads, profile_prefix)
        tok = BundleTokenizer(b.path, b.model.get("eos_token_id"))
        return cls(b, be, state, tok, the_plan, dev)

    # ---- public API -----------------------------------------------------------------
    @property
    def memory(self) -> dict[str, int]:
        """Planned bytes by part, and the cache bytes actually allocated."""
        return {**self.plan.parts, "total": self.plan.total, "budget": self.plan.budget,
                "kv_allocated": self.state.nbytes}

    def reset(self) -> None:
        """Forget the conversation: empty cache, counters at zero."""
        self._close_active()
        self.state.reset()
        self._history = []

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False) -> Generation[str]:
        """Stream text pieces. A string prompt starts from an empty cache; a list of chat
        messages is rendered with the chat template and continues the cache when the
        conversation extends the one it holds."""
        sampler = Sampler(temperature, top_k, top_p, seed)
        self._close_active()
        t0 = time.perf_counter()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            self.reset()
            self._history = None  # raw prompts are not tracked for chat reuse
            reuse = 0
        elif isinstance(prompt, list):
            ids = self.tokenizer.encode_chat(prompt)
            reuse = self._reuse(ids)
        else:
            raise EngineError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        self._check_request(ids, max_new_tokens)
        stats = GenerationStats(prompt_tokens=len(ids), reused_tokens=reuse, _t0=t0)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        tokens = self._tokens(ids[reuse:], sampler, max_new_tokens, ignore_eos, stats)
        return self._start(self._text(tokens, _StopStrings(stops), stats), stats)

    def generate_tokens(self, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                        top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                        ignore_eos: bool = False) -> Generation[int]:
        """Token ids instead of text, appended to whatever the cache holds (call reset()
        first for a fresh sequence)."""
        sampler = Sampler(temperature, top_k, top_p, seed)
        self._check_request(prompt_ids, max_new_tokens)
        self._close_active()
        stats = GenerationStats(prompt_tokens=len(prompt_ids), _t0=time.perf_counter())
        self._history = None
        return self._start(self._tokens(list(prompt_ids), sampler, max_new_tokens, ignore_eos, stats), stats)

    # ---- generation -----------------------------------------------------------------
    def _check_request(self, ids: Sequence[int], max_new: int) -> None:
        if not len(ids):
            raise EngineError("empty prompt: nothing to condition on")
        if max_new < 0:
            raise EngineError(f"max_new_tokens must be >= 0, got {max_new}")
        vocab = int(self.bundle.model["vocab_size"])
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1}); "
                              f"is the tokenizer from another model?")

    def _start(self, it: Iterator[T], stats: GenerationStats) -> Generation[T]:
        def done(g: Generation) -> None:
            self.last_stats = g.stats
            if self._active is g:
                self._active = None
        self._active = Generation(it, stats, done)
        return self._active

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()

    def _tokens(self, ids: list[int], sampler: Sampler, max_new: int, ignore_eos: bool,
                stats: GenerationStats) -> Iterator[int]:
        stats.kv_bytes = self.state.nbytes
        stats.prefill_tokens = len(ids)
        logits = self._feed(ids)
        eos = set() if ignore_eos else self.tokenizer.eos_ids
        t_first = time.perf_counter()
        stats.stop_reason = "length"
        for step in range(max_new):
            tok = sampler(logits)
            stats.new_tokens += 1
            if step == 0:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - stats._t0
            if tok in eos:
                stats.stop_reason = "eos"
                break
            yield tok
            if step == max_new - 1:
                break
            logits = self._feed([tok])  # the last token chosen is never fed: nothing would read it
            stats.decode_s = time.perf_counter() - t_first
        stats.decode_s = time.perf_counter() - t_first

    def _text(self, tokens: Iterator[int], stops: _StopStrings, stats: GenerationStats) -> Iterator[str]:
        detok = self.tokenizer.stream()
        try:
            for tok in tokens:
                out, hit = stops.push(detok.push(tok))
                if out:
                    yield out
                if hit:
                    stats.stop_reason = "stop"
                    return
            out, hit = stops.push(detok.flush())
            out += "" if hit else stops.flush()
            if hit:
                stats.stop_reason = "stop"
            if out:
                yield out
        finally:
            tokens.close()

    def _feed(self, ids: Sequence[int]) -> np.ndarray:
        """Append ids to the cache; logits [V] of the last one. Runs never cross a sink or
        block boundary: a full chunk goes through prefill; fewer tokens before a boundary
        go through one padded prefill (causal, so the padding after them changes none of
        their K/V), except the final token, whose logits come from decode."""
        st, c, i = self.state, self.chunk, 0
        logits = None
        while i < len(ids):
            left = len(ids) - i
            n = min(st.room(), left)
            if c > 1 and n >= c:
                n, t = c, c
            elif c > 1 and (n if n < left else n - 1) >= PAD_MIN:
                n, t = (n if n < left else n - 1), c  # logits of padding: never the last run
            else:
                n, t = 1, 1
            logits = self._step(ids[i:i + n], t)
            if self._history is not None:
                self._history.extend(ids[i:i + n])
            i += n
        return logits

    def _step(self, ids: Sequence[int], t: int) -> np.ndarray:
        self.state.prepare(t)
        logits = self.backend.run(ids, t)
        self.state.append(self.backend.new_kv(t), len(ids), self.backend.pack)
        return logits

    def _reuse(self, ids: list[int]) -> int:
        """How many leading `ids` the cache already holds (rewinding a few residual tokens
        if the conversation diverges there); resets the cache when it cannot reuse."""
        hist = self._history
        if hist:
            p = 0
            for a, b in zip(hist, ids):
                if a != b:
                    break
                p += 1
            p = min(p, len(ids) - 1)  # the last prompt token must be fed for its logits
            if p == len(hist) or (p > 0 and self.state.rewind(p)):
                del hist[p:]
                return p
        self.reset()
        return 0


def _ort(b: Bundle, state: CacheState, dev: DeviceProfile, explicit: bool, threads: int | None,
         profile_prefix: str | None = None):
    from edgekv.runtime.ort_backend import OrtBackend, available_providers

    return OrtBackend(b, state, _providers(dev, available_providers(), explicit), threads, profile_prefix)


def _tvm(b: Bundle, state: CacheState, dev: DeviceProfile, explicit: bool, threads: int | None,
         profile_prefix: None = None):  # load() refuses a profile_prefix for non-ort backends
    import importlib.util

    if b.manifest["graphs"].get("weights_dtype") == "gguf":
        raise EngineError(f"{b.path} keeps GGUF weight blocks (onnxruntime's MatMulNBits), which "
                          f"TVM's ONNX importer does not read; use backend 'ort', or export with --dtype fp32")
    missing = [m for m in ("tvm", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineError(f"backend 'tvm' needs {' and '.join(missing)} (pip install 'edgekv[tvm]')")
    if dev.kind != "cpu":
        warnings.warn(f"backend 'tvm' compiles for the CPU only so far; device {dev.name} runs on its CPU",
                      RuntimeWarning, stacklevel=4)
    from edgekv.runtime.tvm_backend import TvmBackend

    return TvmBackend(b, state, threads)


def _ort_tvm(b: Bundle, state: CacheState, dev: DeviceProfile, explicit: bool, threads: int | None,
             profile_prefix: None = None):
    from edgekv.runtime.kernel_backend import KernelBackend, available

    missing = available()
    if missing:
        raise EngineError(f"backend 'ort+tvm' needs {' and '.join(missing)} (pip install 'edgekv[tvm]')")
    if dev.kind != "cpu":
        warnings.warn(f"backend 'ort+tvm' runs its kernels on the CPU only so far; device {dev.name} runs on "
                      f"its CPU", RuntimeWarning, stacklevel=4)
    return KernelBackend(b, state, ("CPUExecutionProvider",), threads, dev.name)


def _auto_backend(b: Bundle, dev: DeviceProfile, profile_prefix: str | None) -> str:
    """'ort+tvm' where it starts without compiling anything: a CPU device, a bundle holding
    a TVM library for this machine (`edgekv compile`), tvm and onnx installed, plain RoPE;
    otherwise 'ort'. Decode is ~3.8x faster with it on SmolLM2 (BENCHMARKS.md)."""
    if profile_prefix is not None or dev.kind != "cpu" or not b.manifest.get("tvm"):
        return "ort"
    from edgekv.runtime.kernel_backend import KernelBackendError, _check_bundle, _library_entry, available

    try:
        _check_bundle(b)
    except KernelBackendError:
        return "ort"
    return "ort+tvm" if _library_entry(b, dev.name) is not None and not available() else "ort"


# name -> factory(bundle, state, device, device_named_explicitly, threads, profile_prefix);
# each imports its runtime library only when chosen.
BACKENDS: dict[str, Callable[..., "OrtBackend"]] = {"ort": _ort, "tvm": _tvm, "ort+tvm": _ort_tvm}


def _providers(dev: DeviceProfile, available: list[str], explicit: bool) -> list[str]:
    wanted = dev.ort_providers
    chosen = [p for p in wanted if p in available]
    if wanted[0] not in available:
        msg = (f"device {dev.name} wants {wanted[0]}, but this onnxruntime has {', '.join(available)}; "
               f"install onnxruntime-gpu (docs/jetson.md on Jetson)")
        if explicit:
            raise DeviceError(msg)
        warnings.warn(msg + "; running on CPUExecutionProvider", RuntimeWarning, stacklevel=4)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen
