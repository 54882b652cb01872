"""Device profiles: one JSON file per device in the edgekv.devices package.

Adding a device is adding a file; profiles are discovered by listing the package's
*.json. `resolve_device` also accepts "cpu" (the profile for this machine's
architecture) and "cuda" (this machine's GPU: memory from nvidia-smi, or system memory
where nvidia-smi reports none, as on unified-memory Jetsons).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources

from edgekv.errors import EdgekvError

_REQUIRED = {"name": str, "description": str, "memory_bytes": (int, type(None)),
             "memory_bandwidth_gbs": (int, float, type(None)), "tvm_target": dict,
             "ort_providers": list, "budget_share": (int, float)}


class DeviceError(EdgekvError):
    """An unknown or invalid device profile, or a device this machine does not have."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_bytes: int | None  # None: detect this machine's RAM
    memory_bandwidth_gbs: float | None
    tvm_target: dict
    ort_providers: list[str]
    budget_share: float
    kind: str = "cpu"
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def total_memory(self) -> int:
        return self.memory_bytes if self.memory_bytes is not None else system_memory()

    def default_budget(self) -> int:
        """The share of the device's memory edgekv takes when no budget is given."""
        return int(self.total_memory() * self.budget_share)


def system_memory() -> int:
    """MemTotal of this machine (Linux /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        raise DeviceError("cannot detect this machine's memory; pass an explicit budget") from None


def _files() -> dict[str, resources.abc.Traversable]:
    pkg = resources.files("edgekv.devices")
    return {p.name[:-5]: p for p in pkg.iterdir() if p.name.endswith(".json")}


def list_devices() -> list[str]:
    return sorted(_files())


def parse_profile(data: dict, source: str) -> DeviceProfile:
    """Validate one profile's JSON; errors name the file."""
    if not isinstance(data, dict):
        raise DeviceError(f"{source}: a device profile is a JSON object")
    for key, types in _REQUIRED.items():
        if key not in data:
            raise DeviceError(f"{source}: missing {key!r}")
        if not isinstance(data[key], types) or isinstance(data[key], bool):
            raise DeviceError(f"{source}: {key!r} has the wrong type ({type(data[key]).__name__})")
    if data["memory_bytes"] is not None and data["memory_bytes"] <= 0:
        raise DeviceError(f"{source}: memory_bytes must be positive or null (detect)")
    if not 0 < data["budget_share"] <= 1:
        raise DeviceError(f"{source}: budget_share must be in (0, 1], got {data['budget_share']}")
    if not data["ort_providers"] or not all(isinstance(p, str) and p.endswith("ExecutionProvider")
                                            for p in data["ort_providers"]):
        raise DeviceError(f"{source}: ort_providers must list onnxruntime provider names")
    if not isinstance(data["tvm_target"].get("kind"), str):
        raise DeviceError(f"{source}: tvm_target needs a 'kind' (TVM target JSON form)")
    known = set(_REQUIRED) | {"kind", "notes"}
    return DeviceProfile(
        name=data["name"], description=data["description"], memory_bytes=data["memory_bytes"],
        memory_bandwidth_gbs=data["memory_bandwidth_gbs"], tvm_target=data["tvm_target"],
        ort_providers=list(data["ort_providers"]), budget_share=float(data["budget_share"]),
        kind=data.get("kind", "cpu"), notes=data.get("notes", ""),
        extra={k: v for k, v in data.items() if k not in known})


def load_device(name: str) -> DeviceProfile:
    files = _files()
    if name not in files:
        raise DeviceError(f"unknown device {name!r}; known devices: {', '.join(['cpu', 'cuda', *sorted(files)])}")
    source = f"devices/{name}.json"
    try:
        data = json.loads(files[name].read_text())
    except json.JSONDecodeError as e:
        raise DeviceError(f"{source} is not valid JSON: {e}") from None
    profile = parse_profile(data, source)
    if profile.name != name:
        raise DeviceError(f"{source}: 'name' is {profile.name!r}, expected the file name {name!r}")
    return profile


def _cuda_memory() -> int | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[0]) << 20 if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def resolve_device(device: str | DeviceProfile) -> DeviceProfile:
    """A profile from a name: 'cpu', 'cuda', or a profile file name."""
    if isinstance(device, DeviceProfile):
        return device
    if device == "cpu":
        arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
        return load_device(f"cpu-{arch}") if f"cpu-{arch}" in _files() else load_device("cpu-x86_64")
    if device == "cuda":
        mem = _cuda_memory()
        return DeviceProfile(
            name="cuda", description="this machine's CUDA GPU", memory_bytes=mem, memory_bandwidth_gbs=None,
            tvm_target={"kind": "cuda", "host": {"kind": "llvm"}},
            ort_providers=["CUDAExecutionProvider", "CPUExecutionProvider"], budget_share=0.9, kind="gpu",
            notes="" if mem else "no GPU memory from nvidia-smi: using system memory (right for "
                                 "unified-memory devices such as Jetson; pass a budget otherwise)")
    return load_device(device)
