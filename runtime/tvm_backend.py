"""TVM backend (`Engine.load(..., backend="tvm")`): the bundle's graphs compiled by Relax.

Each of decode.onnx / prefill.onnx / pack.onnx is loaded with its weights, its `edgekv`
functions inlined (onnx.inliner: their bodies are standard opset-18 ops), imported with
`tvm.relax.frontend.onnx`, built for the CPU (llvm) and run by the Relax VM. The cache
stays CacheState's preallocated numpy buffers (64-byte aligned), handed to the VM as
DLPack views made once at load (no copy per step); the VM returns fresh output tensors
(logits, new K/V, packed block), copied into buffers allocated here, so the Engine
drives this backend exactly like OrtBackend. Compiling the three graphs takes ~25 s on
the tiny test model (at every load: nothing is cached yet).

Not yet (docs/ARCHITECTURE.md "TVM kernels"): mapping the `edgekv` functions onto the
hand-scheduled tvm_kernels (needs the graph contract change: rotated q, block angles
and counters), GPU targets, and caching the compiled executables in the bundle.
Imports tvm and onnx (the frontend needs it); the runtime imports this module only
for backend="tvm". torch is hidden while tvm is imported (see _NoTorch).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

import numpy as np

from edgekv.runtime.bundle import Bundle
from edgekv.runtime.cache_state import CacheState, aligned_zeros, graph_outputs, new_token_buffers

_NP_TYPES = {1: np.float32, 10: np.float16, 2: np.uint8, 7: np.int64, 9: np.bool_}


def _compile(path, target: str):
    import onnx
    import onnx.inliner
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = onnx.load(str(path), load_external_data=True)  # weights.bin, next to the graph
    model = onnx.inliner.inline_local_functions(model)
    inputs = [(i.name, [d.dim_value for d in i.type.tensor_type.shape.dim], _NP_TYPES[i.type.tensor_type.elem_type])
              for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    with warnings.catch_warnings():  # "Renaming name past.0.sink_k to past_0_sink_k"
        warnings.simplefilter("ignore", UserWarning)
        mod = from_onnx(model, opset=18, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    ex = tvm.compile(mod, target=tvm.target.Target(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm, inputs, outputs


class _NoTorch:
    """Import finder that hides torch: tvm_ffi's __init__ imports torch when it is
    installed (only to order shared-library loading, and for torch-tensor conversion,
    which this backend never uses); that would cost the runtime seconds and hundreds of MB."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("edgekv's TVM backend does not use torch")
        return None


def _import_tvm():
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm
        return tvm
    blocker = _NoTorch()
    sys.meta_path.insert(0, blocker)
    try:
        import tvm
        from tvm import relax  # noqa: F401  (imports the rest of tvm while torch is hidden)
        from tvm.relax.frontend import onnx  # noqa: F401
    finally:
        sys.meta_path.remove(blocker)
    return tvm


class TvmBackend:
    name = "tvm"

    def __init__(self, bundle: Bundle, state: CacheState, threads: int | None = None,
                 target: str = "llvm") -> None:
        if threads:  # read when TVM's thread pool starts (first parallel kernel)
            os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        self._tvm = _import_tvm()
        self.state, self.chunk = state, bundle.prefill_chunk
        self.graphs = {kind: _compile(bundle.graph_path(kind), target) for kind in ("decode", "prefill", "pack")}

        m, sh = bundle.model, bundle.shape
        self.logits = np.zeros((1, 1, int(m["vocab_size"])), np.float32)
        self.input_ids = {t: aligned_zeros((1, t), np.int64) for t in (1, self.chunk)}
        self.new = {t: new_token_buffers(bundle.policy, sh, t) for t in (1, self.chunk)}
        st = self.state
        self._args = {}
        for t, kind in ((1, "decode"), (self.chunk, "prefill")):
            arrays = {"input_ids": self.input_ids[t], "new_positions": st.new_positions[t],
                      "cache_positions": st.cache_positions, "cache_valid": st.cache_valid, **st.buffers}
            self._args[t] = [self._view(self._checked(kind, name, shape, dt, arrays[name]))
                             for name, shape, dt in self.graphs[kind][1]]
            outs = {"logits": self.logits}
            outs.update(graph_outputs(self.new[t]))
            self._args[t] = (self._args[t], [outs[o] for o in self.graphs[kind][2]])
        _, pack_in, pack_out = self.graphs["pack"]
        self._pack_args = []
        for unit in range(bundle.policy.num_units):
            res = st.pack_inputs(unit)
            self._pack_args.append([self._view(self._checked("pack", name, shape, dt, res[name]))
                                    for name, shape, dt in pack_in])
        self._pack_names = pack_out
        self.packed: dict[str, np.ndarray] = {}

    @staticmethod
    def _checked(kind: str, name: str, shape, dt, arr: np.ndarray) -> np.ndarray:
        if list(arr.shape) != list(shape) or arr.dtype != dt:
            raise ValueError(f"{kind}.onnx input {name} is {np.dtype(dt)}{list(shape)}, buffer is "
                             f"{arr.dtype}{list(arr.shape)}")
        return arr

    def _view(self, arr: np.ndarray):
        """A TVM tensor on the numpy buffer's memory (no copy; the buffer is never reallocated)."""
        return self._tvm.runtime.from_dlpack(arr)

    def _call(self, kind: str, args: Sequence) -> list[np.ndarray]:
        out = self.graphs[kind][0]["main"](*args)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [o.numpy() for o in outs]

    # ---- the interface the Engine drives (same as OrtBackend) -------------------------
    def run(self, ids: Sequence[int], t: int) -> np.ndarray:
        buf = self.input_ids[t]
        buf.fill(0)
        buf[0, :len(ids)] = ids
        ins, outs = self._args[t]
        for dst, src in zip(outs, self._call("decode" if t == 1 else "prefill", ins)):
            dst[...] = src.reshape(dst.shape)
        return self.logits[0, 0]

    def new_kv(self, t: int) -> list[dict[str, np.ndarray]]:
        """What the last run with t token slots wrote for each layer's new K/V."""
        return self.new[t]

    def pack(self, layer: int) -> dict[str, np.ndarray]:
        got = self._call("pack", self._pack_args[layer])
        for name, arr in zip(self._pack_names, got):
            if name in self.packed:
                self.packed[name][...] = arr
            else:
                self.packed[name] = arr.copy()
        return self.packed

    @property
    def active_providers(self) -> list[str]:
        return ["tvm:llvm"]
