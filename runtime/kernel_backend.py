"""Kernel backend (`Engine.load(..., backend="ort+tvm")`): onnxruntime for the layers,
the fused TVM dequantize-attention kernel for decode attention.

Why this split: in decode.onnx each layer's attention unpacks and dequantizes the whole
ring in ~15 elementwise onnxruntime ops per step, which is where a compressed bundle loses
its speed (BENCHMARKS.md); the TVM kernel reads the packed ring directly. The matmuls stay
in onnxruntime, so `--dtype gguf` bundles (MatMulNBits) run here too, which Relax cannot.

A decode step runs L+1 onnxruntime segments of decode.onnx cut at the attention nodes
(graph_split.py). Between segment i and i+1 the host writes layer i's new K/V into the
sinks/residual (the kernel's contract; CacheState.append rewrites the same values after
the step): every part the segment outputs, `new.{i}.k` and with an 8-bit residual also
`new.{i}.k_scale`, `new.{i}.k_zero` (and v's), as the sinks/residual store them. It then
rotates the query with RoPE at the new position, and calls `decode_k{bk}_v{bv}` (`_gv{G}`
for a layer's own value group, `_r8`/`_r8h`/`_r8hr` for an 8-bit residual) on CacheState's buffers
(zero-copy views made once at load). Prefill chunks and block packing run the bundle's
prefill.onnx and pack.onnx as in OrtBackend.

Kernels come from the bundle's library for this machine (`edgekv compile BUNDLE --device
host`) when it has one, else they are compiled at load (seconds per bit pair).
"""

from __future__ import annotations

import os
import platform
import warnings
from typing import Sequence

import numpy as np
import onnxruntime as ort

from edgekv.errors import EdgekvError
from edgekv.runtime.bundle import Bundle
from edgekv.runtime.cache_state import CacheState, aligned_zeros, graph_outputs
from edgekv.runtime.ort_backend import OrtBackend


# One thread per decode-segment session: every onnxruntime session has its own intra-op
# pool whose workers spin after a run, so 31 two-thread sessions run back to back kept
# spinning workers on the cores the next session and the kernel needed (SmolLM2 on 2
# cores: 34.8 -> 41.4 tok/s with one thread; fp32 weights 15.5 -> 19.5).
SEGMENT_THREADS = 1


class KernelBackendError(EdgekvError):
    """A bundle this backend cannot run."""


def _check_bundle(bundle: Bundle) -> None:
    rope = bundle.model.get("rope") or {}
    if rope.get("rope_type", "default") != "default":
        raise KernelBackendError(f"{bundle.path}: RoPE type {rope.get('rope_type')!r} is not supported by "
                                 f"the TVM kernels (plain Llama RoPE only); use backend 'ort'")


def _library_entry(bundle: Bundle, device: str) -> dict | None:
    """The bundle's compiled library for this machine: the device's own, else `host`
    (compiled on a machine of this architecture)."""
    libs = bundle.manifest.get("tvm", {})
    for name in (device, "host"):
        e = libs.get(name)
        if e and e["target"].get("kind") == "llvm" and \
                str(e["target"].get("mtriple", "")).startswith(platform.machine()):
            return e
    return None


def decode_kernels(bundle: Bundle, device: str) -> dict[tuple[int, ...], object]:
    """tvm_kernels.params.kernel_key (bits_k, bits_v, value group[, KV heads]) -> the packed
    function of its decode kernel."""
    from edgekv.runtime.tvm_backend import _import_tvm

    tvm = _import_tvm()
    from edgekv.tvm_kernels.library import kernel_names
    from edgekv.tvm_kernels.params import attn_params, kernel_key

    p, sh = bundle.policy, bundle.shape
    names = kernel_names(p, sh.num_kv_heads).decode  # the names say the cache format: a library never mismatches it
    entry = _library_entry(bundle, device)
    if entry is not None:
        lib = tvm.runtime.load_module(str(bundle.path / entry["library"]))
        return {key: lib[name] for key, name in names.items()}
    warnings.warn(f"{bundle.path} has no TVM library for this machine: compiling the decode kernels now "
                  f"(`edgekv compile {bundle.path} --device host` stores them in the bundle)",
                  RuntimeWarning, stacklevel=5)
    from edgekv.tvm_kernels.build import build_attention
    from edgekv.tvm_kernels.targets import host_target, host_tuning_device

    records = host_tuning_device()
    out = {}
    for key in names:
        layer = next(i for i in range(p.num_units) if kernel_key(p, i, sh.num_kv_heads) == key)
        params = attn_params(p, sh, layer, int(bundle.model["num_heads"]))
        out[key] = build_attention(params, host_target(), device=records)["main"]
    return out


class KernelBackend(OrtBackend):
    name = "ort+tvm"
    GRAPHS = ("prefill", "pack")  # decode runs as segments + kernels

    def __init__(self, bundle: Bundle, state: CacheState, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None, device: str = "cpu") -> None:
        _check_bundle(bundle)
        if threads:  # read when TVM's thread pool starts (first parallel kernel)
            os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        kernels = decode_kernels(bundle, device)
        super().__init__(bundle, state, providers, threads)  # sessions; segments via the hook
        from edgekv.runtime.tvm_backend import _import_tvm
        from edgekv.tvm_kernels.params import attn_params, kernel_key
        from edgekv.tvm_kernels.rope import RopeTables, inv_freq

        self._tvm = _import_tvm()
        p, sh = bundle.policy, bundle.shape
        self.num_layers = sh.num_layers
        rope = bundle.model.get("rope") or {}
        freqs = inv_freq(sh.head_dim, float(rope.get("rope_theta", 10000.0)))
        self._freqs = np.concatenate([freqs, freqs])  # [D], rotate-half layout
        tables = RopeTables(p, freqs, state.slots)
        for name in ("sink_cos", "sink_sin", "off_cos", "off_sin", "blk_cos", "blk_sin"):
            arr = getattr(tables, name)
            aligned = aligned_zeros(arr.shape, arr.dtype)
            aligned[...] = arr
            setattr(tables, name, aligned)  # update() writes blk_* in place
        self.tables = tables
        self.counts = aligned_zeros(3, np.int32)
        self._cos = np.zeros(sh.head_dim, np.float32)
        self._sin = np.zeros(sh.head_dim, np.float32)
        self._bind_segments()
        view = self._tvm.runtime.from_dlpack
        buf = state.buffers
        t = tables
        # Per layer, its units' kernel calls. A unit of a split layer (policy.units) reads its
        # query heads from q_rot into its own buffer and its output goes back the same way.
        hq = int(bundle.model["num_heads"])
        rep = hq // sh.num_kv_heads
        self._calls = []
        for i in range(self.num_layers):
            calls = []
            for u in p.layer_units(i):
                params = attn_params(p, sh, u, hq, context=p.sinks + state.slots * p.block)
                heads = p.unit_heads(u, sh.num_kv_heads)
                idx = None if len(heads) == sh.num_kv_heads else np.array([h * rep + r for h in heads for r in range(rep)])
                q, o = (self.q_rot, self.attn_out[i]) if idx is None else \
                    (aligned_zeros((1, len(idx), *self.q_rot.shape[2:]), np.float32) for _ in range(2))
                arrays = [q, *(buf[f"past.{u}.{n}"] for n in params.cache_names),
                          t.sink_cos, t.sink_sin, t.blk_cos, t.blk_sin, t.off_cos, t.off_sin, self.counts, o]
                calls.append((kernels[kernel_key(p, u, sh.num_kv_heads)], [view(a) for a in arrays], idx, q, o))
            self._calls.append(calls)

    # ---- setup ----------------------------------------------------------------------
    def _setup_extra_sessions(self, bundle: Bundle) -> None:
        import onnx

        from edgekv.runtime.graph_split import split_at_attention

        model = onnx.load(str(bundle.graph_path("decode")), load_external_data=False)
        self.split = split_at_attention(model)
        external = {t.name for t in bundle.external_weights("decode")}
        self.segments = []
        for seg in self.split.segments:
            names = {t.name for t in seg.model.graph.initializer} & external
            self.segments.append(self._session(bundle, "decode", seg.model.SerializeToString(), names,
                                               threads=SEGMENT_THREADS))

    def _bind_segments(self) -> None:
        """Bind every segment's inputs and outputs to buffers allocated here. Shapes of the
        tensors that cross cuts come from one dry run of the segments at load."""
        st, sh = self.state, self.state.shape
        bufs: dict[str, np.ndarray] = {"input_ids": self.input_ids[1], "new_positions": st.new_positions[1],
                                       "cache_positions": st.cache_positions, "cache_valid": st.cache_valid,
                                       "logits": self.logits, **st.buffers}
        bufs.update(graph_outputs(self.new[1]))  # new.{i}.k, new.{i}.k_scale, ... (OrtBackend.new)
        self.queries, self.attn_out, self._seg_io = [], [], []
        for seg, sess in zip(self.split.segments, self.segments):
            got = sess.run(seg.outputs, {name: bufs[name] for name in seg.inputs})
            for name, arr in zip(seg.outputs, got):
                if name not in bufs:
                    bufs[name] = aligned_zeros(arr.shape, arr.dtype)
                elif bufs[name].shape != arr.shape or bufs[name].dtype != arr.dtype:
                    raise KernelBackendError(f"decode segment output {name} is {arr.dtype}{arr.shape}, "
                                             f"its buffer {bufs[name].dtype}{bufs[name].shape}")
            io = sess.io_binding()
            for name in seg.inputs:
                self._bind(io, name, bufs[name])
            for name in seg.outputs:
                self._bind(io, name, bufs[name], output=True)
            self._seg_io.append((sess, io))
            if seg.attention is not None:
                q = bufs[seg.attention.input[0]]
                if q.ndim != 4 or q.shape[2:] != (1, sh.head_dim) or q.dtype != np.float32:
                    raise KernelBackendError(f"unexpected query {q.dtype}{q.shape} at {seg.attention.name}")
                self.queries.append(q)
                bufs[seg.attention.output[0]] = aligned_zeros(q.shape, np.float32)
                self.attn_out.append(bufs[seg.attention.output[0]])
        self._seg_buffers = bufs  # IOBinding holds raw pointers, not references: keep them alive
        self.q_rot = aligned_zeros(self.queries[0].shape, np.float32)
        self._half = np.zeros_like(self.q_rot)

    # ---- running --------------------------------------------------------------------
    def _rope_query(self, q: np.ndarray) -> None:
        """q_rot = q*cos + rotate_half(q)*sin (the HF convention), into the bound buffer."""
        h = q.shape[-1] // 2
        np.multiply(q, self._cos, out=self.q_rot)
        np.multiply(q[..., h:], -self._sin[:h], out=self._half[..., :h])
        np.multiply(q[..., :h], self._sin[h:], out=self._half[..., h:])
        self.q_rot += self._half

    def run(self, ids: Sequence[int], t: int) -> np.ndarray:
        if t != 1:
            return super().run(ids, t)
        st, buf = self.state, self.state.buffers
        self.input_ids[1][0, 0] = ids[0] if len(ids) else 0
        ang = float(st.new_positions[1][0]) * self._freqs
        self._cos[...], self._sin[...] = np.cos(ang), np.sin(ang)
        self.tables.update(st.n_sink, st.blocks_pushed)
        sink = st.n_sink < st.S
        self.counts[...] = (st.n_sink + 1, st.ring_filled, 0) if sink else (st.n_sink, st.ring_filled, st.n_res + 1)
        part, at = ("sink", st.n_sink) if sink else ("residual", st.n_res)
        for i, (sess, io) in enumerate(self._seg_io):
            sess.run_with_iobinding(io)
            if i == self.num_layers:
                break
            for u in self.state.policy.layer_units(i):  # k, v (+ k_scale, ... with an 8-bit residual)
                for name, arr in self.new[1][u].items():
                    buf[f"past.{u}.{part}_{name}"][:, :, at] = arr[:, :, 0]
            self._rope_query(self.queries[i])
            for fn, args, idx, q, o in self._calls[i]:
                if idx is not None:
                    np.take(self.q_rot, idx, axis=1, out=q)
                fn(*args)
                if idx is not None:
                    self.attn_out[i][:, idx] = o
        return self.logits[0, 0]

    @property
    def active_providers(self) -> list[str]:
        return [*self.sessions["prefill"].get_providers(), "tvm:llvm"]


def available() -> list[str]:
    """What is missing for this backend (empty when it can run)."""
    import importlib.util

    return [m for m in ("tvm", "onnx") if importlib.util.find_spec(m) is None] + \
        ([] if "CPUExecutionProvider" in ort.get_available_providers() else ["onnxruntime CPU"])
