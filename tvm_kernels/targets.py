"""TVM targets: from a device profile's `tvm_target` (devices/*.json) or the host.

TVM 0.27 takes targets as dicts only (the "llvm -mcpu=..." strings are gone), which is
the shape the device profiles already store.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import resources
from typing import Any

import tvm

# The CUDA architectures we generate and nvcc-compile for (issue: Orin, RTX 30/40, H100).
CUDA_ARCHS = ("sm_86", "sm_87", "sm_89", "sm_90")


def host_spec(num_cores: int | None = None) -> dict[str, Any]:
    """The machine we run on, with LLVM's own name for its CPU."""
    mcpu = tvm.target.codegen.llvm_get_system_cpu() if hasattr(tvm.target, "codegen") else None
    spec: dict[str, Any] = {"kind": "llvm", "mtriple": f"{platform.machine()}-linux-gnu"}
    if mcpu and mcpu != "generic":
        spec["mcpu"] = mcpu
    spec["num-cores"] = num_cores or os.cpu_count() or 1
    return spec


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    return tvm.target.Target(host_spec(num_cores))


def host_tuning_device() -> str | None:
    """The device profile whose tuning records (devices/tuning/) fit this host's CPU."""
    return "cpu-x86_64" if platform.machine() == "x86_64" else None


def device_spec(name: str) -> dict[str, Any]:
    """The `tvm_target` dict of a device profile shipped in edgekv.devices."""
    text = resources.files("edgekv.devices").joinpath(f"{name}.json").read_text()
    return dict(json.loads(text)["tvm_target"])


def device_target(name: str) -> tvm.target.Target:
    return tvm.target.Target(device_spec(name))


def cuda_target(arch: str, host: dict[str, Any] | None = None) -> tvm.target.Target:
    spec: dict[str, Any] = {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
                            "max_shared_memory_per_block": 49152, "thread_warp_size": 32}
    spec["host"] = host or {"kind": "llvm"}
    return tvm.target.Target(spec)


def is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")
