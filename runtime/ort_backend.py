"""onnxruntime backend: decode / prefill / pack sessions bound onto preallocated buffers.

Memory is decided here once:
* weights.bin is memory-mapped once and every external initializer of decode.onnx and
  prefill.onnx is handed to both sessions as the same OrtValue (`add_initializer`), so
  the two graphs share one copy of the weights. Prepacking is disabled because it makes
  a private packed copy of every Gemm weight per session (measured on SmolLM2-135M:
  1.33 GB RSS for the two sessions with it, 0.75 GB without, and no slower) -- except
  for `--dtype gguf` bundles: MatMulNBits runs its int8 kernels only on prepacked
  weights (6x slower decode without). Each session then holds its own packed copy
  (~1.15x the file; onnxruntime's Python API cannot share a prepacked-weights container),
  and the mapped file pages that prepacking read are handed back to the page cache.
* Every input and output is bound with IOBinding to a numpy buffer allocated here or in
  CacheState, so a step allocates nothing that outlives it; the host only rewrites
  those buffers in place.
* Intermediate tensors come from one process-wide CPU arena shared by all sessions
  (`session.use_env_allocators`), and memory patterns are off: with a private arena and
  a pattern per session, SmolLM2-135M held ~150 MB of activations; shared and without
  patterns, ~53 MB at the same speed.

With CUDAExecutionProvider the buffers stay in host memory and onnxruntime copies them
to the device on each run: correct, but it moves the whole cache per step (untested
here: no GPU). Keeping the ring on the device is the TVM backend's job.
"""

from __future__ import annotations

import mmap
from typing import Collection, Sequence

import numpy as np
import onnxruntime as ort

from edgekv.runtime.bundle import Bundle
from edgekv.runtime.cache_state import CacheState, graph_outputs, new_token_buffers

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
             "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


_ENV_ARENA = False


def _map_file(path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def _shared_cpu_arena() -> None:
    """Register the process-wide CPU arena once (onnxruntime refuses a second one)."""
    global _ENV_ARENA
    if _ENV_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # max_mem 0 (no cap), extend by what is requested (not powers of two), defaults otherwise.
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
    except Exception:  # already registered by another Engine in this process
        pass
    _ENV_ARENA = True


class OrtBackend:
    name = "ort"
    GRAPHS = ("decode", "prefill", "pack")  # a subclass may run decode its own way

    def __init__(self, bundle: Bundle, state: CacheState, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, profile_prefix: str | None = None) -> None:
        self.state, self.chunk = state, bundle.prefill_chunk
        self.providers = list(providers)
        self.threads = threads
        self.profile_prefix = profile_prefix  # onnxruntime's per-node profiler (edgekv profile --ops)
        _shared_cpu_arena()
        self._map = _map_file(bundle.weights_path) if bundle.weights_bytes else None
        self._weights = np.frombuffer(self._map, np.uint8) if self._map is not None else None
        self._initializers: dict[str, ort.OrtValue] = {}  # shared by decode and prefill
        self.prepack = bundle.manifest["graphs"].get("weights_dtype") == "gguf"
        self.sessions = {kind: self._session(bundle, kind) for kind in self.GRAPHS}
        self._setup_extra_sessions(bundle)
        if self.prepack and self._map is not None:
            # the packed copies are what runs now; untouched pages fault back in if read
            self._map.madvise(mmap.MADV_DONTNEED)

        # Graph I/O buffers: allocated here, once.
        m, sh = bundle.model, bundle.shape
        self.logits = np.zeros((1, 1, int(m["vocab_size"])), np.float32)
        self.input_ids = {t: np.zeros((1, t), np.int64) for t in (1, self.chunk)}
        self.new = {t: new_token_buffers(bundle.policy, sh, t) for t in (1, self.chunk)}
        self._graph_io = {t: self._bind_graph(kind, t) for t, kind in ((1, "decode"), (self.chunk, "prefill"))
                          if kind in self.sessions}
        pack_sess = self.sessions["pack"]
        self.packed = {o.name: np.zeros(o.shape, _NP_TYPES[o.type]) for o in pack_sess.get_outputs()}
        self._pack_io = [self._bind_pack(u) for u in range(bundle.policy.num_units)]

    # ---- setup ----------------------------------------------------------------------
    def _options(self, threads: int | None = None) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or self.threads or 0  # 0: onnxruntime's default (physical cores)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_mem_pattern = False
        if not self.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("session.use_env_allocators", "1")
        return so

    def _setup_extra_sessions(self, bundle: Bundle) -> None:
        """Hook for subclasses: more sessions, created before the weights' pages are dropped."""

    def _session(self, bundle: Bundle, kind: str, model: bytes | None = None,
                 weights: Collection[str] = (), threads: int | None = None) -> ort.InferenceSession:
        """A session on graph `kind` of the bundle, or on the serialized ONNX `model` (which
        uses the external initializers `weights` of `kind`), with the shared mapped weights.
        `threads` overrides the backend's intra-op thread count for this session."""
        so = self._options(threads)
        if self.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = f"{self.profile_prefix}_{kind}"
        for t in bundle.external_weights(kind):
            if model is not None and t.name not in weights:
                continue
            if t.name not in self._initializers:
                data = self._weights[t.offset:t.offset + t.length].view(t.dtype).reshape(t.shape)
                self._initializers[t.name] = ort.OrtValue.ortvalue_from_numpy(data)
            so.add_initializer(t.name, self._initializers[t.name])
        if model is not None:  # a graph given as bytes finds its external data in this folder
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(bundle.graph_path(kind).parent))
        source = model if model is not None else str(bundle.graph_path(kind))
        return ort.InferenceSession(source, so, providers=self.providers)

    @staticmethod
    def _bind(io: ort.IOBinding, name: str, arr: np.ndarray, output: bool = False) -> None:
        assert arr.flags.c_contiguous
        bind = io.bind_output if output else io.bind_input
        bind(name, "cpu", 0, arr.dtype.type, list(arr.shape), arr.ctypes.data)

    def _bind_graph(self, kind: str, t: int) -> ort.IOBinding:
        sess, st = self.sessions[kind], self.state
        io = sess.io_binding()
        arrays = {"input_ids": self.input_ids[t], "new_positions": st.new_positions[t],
                  "cache_positions": st.cache_positions, "cache_valid": st.cache_valid, **st.buffers}
        for i in sess.get_inputs():
            arr = arrays[i.name]
            if list(arr.shape) != list(i.shape) or arr.dtype != _NP_TYPES[i.type]:
                raise ValueError(f"{kind}.onnx input {i.name} is {i.type}{i.shape}, buffer is "
                                 f"{arr.dtype}{list(arr.shape)}")
            self._bind(io, i.name, arr)
        outs = {"logits": self.logits}
        outs.update(graph_outputs(self.new[t]))
        for o in sess.get_outputs():
            self._bind(io, o.name, outs[o.name], output=True)
        return io

    def _bind_pack(self, layer: int) -> ort.IOBinding:
        sess = self.sessions["pack"]
        io = sess.io_binding()
        arrays = self.state.pack_inputs(layer)
        for i in sess.get_inputs():
            self._bind(io, i.name, arrays[i.name])
        for name, arr in self.packed.items():
            self._bind(io, name, arr, output=True)
        return io

    # ---- running --------------------------------------------------------------------
    def run(self, ids: Sequence[int], t: int) -> np.ndarray:
        """Run the graph with t token slots (1: decode, chunk: prefill) on `ids` (<= t real
        tokens, the rest padding; CacheState.prepare(t) was called). Returns the logits
        of slot t-1, [V] (a view of the bound output buffer)."""
        buf = self.input_ids[t]
        buf.fill(0)
        buf[0, :len(ids)] = ids
        sess = self.sessions["decode" if t == 1 else "prefill"]
        io = self._graph_io[t]
        sess.run_with_iobinding(io)
        io.synchronize_outputs()
        return self.logits[0, 0]

    def new_kv(self, t: int) -> list[dict[str, np.ndarray]]:
        """What the last run with t token slots wrote for each layer's new K/V."""
        return self.new[t]

    def pack(self, layer: int) -> dict[str, np.ndarray]:
        """Quantize + pack `layer`'s full residual (bound in place) into the scratch outputs."""
        io = self._pack_io[layer]
        self.sessions["pack"].run_with_iobinding(io)
        io.synchronize_outputs()
        return self.packed

    def end_profiling(self) -> dict[str, str]:
        """Stop onnxruntime's profiler: {graph kind: its JSON trace file} (profiling only)."""
        return {kind: s.end_profiling() for kind, s in self.sessions.items()} if self.profile_prefix else {}

    @property
    def active_providers(self) -> list[str]:
        return self.sessions["prefill"].get_providers()
