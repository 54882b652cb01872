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


def schedule(func, target: tvm.target.Target, cpu_rule: Callable | None = None) -> tvm.IRModule:
    """A scheduled IRModule: rules match or return None, the generic fallback comes last."""
    mod = tvm.IRModule({"main": func})
    if is_gpu(target):
        return _dlight(mod, target)
    if cpu_rule is not None:
        sch = cpu_rule(s_tir.Schedule(mod))
        if sch is not None:
            return sch.mod
    return mod  # plain loops: correct, slow


def _compile(key: str, func, target: tvm.target.Target, cpu_rule) -> tvm.runtime.Module:
    ck = (key, str(target))
    if ck not in _CACHE:
        _CACHE[ck] = tvm.compile(schedule(func, target, cpu_rule), target=target)
    return _CACHE[ck]


def build_pack(p: PackParams, side: str, target: tvm.target.Target) -> tvm.runtime.Module:
    return _compile(f"pack_{side}_{p.key}", pack_func(p, side), target, schedule_cpu.pack)


def build_attention(p: AttnParams, target: tvm.target.Target, tuned: bool = True) -> tvm.runtime.Module:
    rule = (lambda sch: schedule_cpu.attention(sch, p, target)) if tuned else None
    return _compile(f"attn_{p.key}_{'t' if tuned else 'p'}", attention_func(p), target, rule)
