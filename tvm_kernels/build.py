"""Compile kernels for a target: the CPU schedule for llvm, tuning records if a device
has them, dlight default schedules otherwise (and always for GPUs without records).

`build` caches compiled modules per process, keyed by kernel and target.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm import s_tir

from edgekv.tvm_kernels import schedule_cpu
from edgekv.tvm_kernels.attention import attention_func
from edgekv.tvm_kernels.pack import pack_func
from edgekv.tvm_kernels.params import AttnParams, PackParams
from edgekv.tvm_kernels.targets import is_gpu

_CACHE: dict[tuple[str, str], tvm.runtime.Module] = {}


def _dlight(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    from tvm.s_tir import dlight as dl
    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    with target:
        return dl.ApplyDefaultSchedule(*rules)(mod)


def schedule(func, target: tvm.target.Target, cpu_rule: Callable | None = None,
             device: str | None = None) -> tvm.IRModule:
    """A scheduled IRModule. First match wins: the device's tuning records
    (devices/tuning/<device>/), the hand CPU rule, dlight on GPUs, plain loops."""
    mod = tvm.IRModule({"main": func})
    if device is not None:
        from edgekv.tvm_kernels.tune import tuned_schedule

        sch = tuned_schedule(func, target, device)
        if sch is not None:
            return sch.mod
    if is_gpu(target):
        return _dlight(mod, target)
    if cpu_rule is not None:
        sch = cpu_rule(s_tir.Schedule(mod))
        if sch is not None:
            return sch.mod
    return mod  # plain loops: correct, slow


def scheduled_attention(p: AttnParams, target: tvm.target.Target, device: str | None = None):
    """The scheduled PrimFunc (keeps its global_symbol, for libraries of many kernels)."""
    return schedule(attention_func(p, is_gpu(target)), target, lambda sch: schedule_cpu.attention(sch, p, target), device)["main"]


def scheduled_pack(p: PackParams, side: str, target: tvm.target.Target):
    return schedule(pack_func(p, side), target, schedule_cpu.pack)["main"]


def compile_module(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.runtime.Module:
    return tvm.compile(mod, target=target)


def cuda_source(lib: tvm.runtime.Module) -> str:
    """The CUDA C++ of a built CUDA module. TVM 0.27 keeps device code as source in the
    module and compiles it when the module is loaded on a GPU."""
    mod = lib.mod if hasattr(lib, "mod") else lib
    return "\n\n".join(m.inspect_source("cuda") for m in mod.imports if m.kind == "cuda")


def nvcc_fatbin(source: str, target: tvm.target.Target) -> bytes:
    """Ahead-of-time nvcc compile of generated CUDA source for the target's sm_XX (proves
    the code compiles for that arch; the bytes can ship beside the library). Without
    --use_fast_math (TVM's nvcc default): the pack kernel's division must be IEEE to
    stay bit exact with the reference."""
    import os

    from tvm.support import nvcc

    num = str(target.attrs["arch"]).removeprefix("sm_")
    os.environ.setdefault("TVM_CUDA_NVCC_NO_FAST_MATH", "1")
    with target:
        return nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc",
                                 arch=["-gencode", f"arch=compute_{num},code=sm_{num}"])


def _compile(key: str, func, target: tvm.target.Target, cpu_rule, device: str | None = None) -> tvm.runtime.Module:
    ck = (key, str(target))
    if ck not in _CACHE:
        _CACHE[ck] = compile_module(schedule(func, target, cpu_rule, device), target)
    return _CACHE[ck]


def build_pack(p: PackParams, side: str, target: tvm.target.Target) -> tvm.runtime.Module:
    return _compile(f"pack_{side}_{p.key}", pack_func(p, side), target, schedule_cpu.pack)


def build_attention(p: AttnParams, target: tvm.target.Target, tuned: bool = True,
                    device: str | None = None) -> tvm.runtime.Module:
    """tuned=False: plain loops (a baseline); device: also look up its tuning records."""
    rule = (lambda sch: schedule_cpu.attention(sch, p, target)) if tuned else None
    return _compile(f"attn_{p.key}_{'t' if tuned else 'p'}_{device}", attention_func(p, is_gpu(target)), target, rule,
                    device if tuned else None)
