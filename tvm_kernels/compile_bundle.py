"""`edgekv compile BUNDLE --device NAME`: add a device's TVM kernel library to a bundle.

Writes tvm/<device>.so (+ .fatbin for CUDA targets) and records them in the manifest:
the files with size and sha256 (so open_bundle verifies them like every other file) and
a `tvm` section per device: target, library, function names. The manifest is replaced
atomically. `Engine.load(..., backend="ort+tvm")` loads the host's library and runs its
decode kernels. A rotated bundle's library holds attention kernels only (the pack kernels
do not rotate; pack.onnx does).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edgekv.errors import EdgekvError
from edgekv.files import sha256


def compile_bundle(bundle: str | Path, device: str) -> dict:
    from edgekv.bundle_format import MANIFEST
    from edgekv.runtime.bundle import manifest_policy, read_manifest

    try:
        import tvm

        from edgekv.tvm_kernels.library import export
        from edgekv.tvm_kernels.targets import device_spec, host_spec, host_tuning_device
    except ImportError as e:
        raise EdgekvError(f"edgekv compile needs Apache TVM: pip install 'edgekv[tvm]' ({e})") from None

    path = Path(bundle)
    manifest = read_manifest(path)
    policy, shape = manifest_policy(manifest, path)
    try:
        spec = host_spec() if device == "host" else device_spec(device)
    except FileNotFoundError:
        raise EdgekvError(f"unknown device {device!r} (a devices/*.json profile name, or 'host')") from None
    target = tvm.target.Target(spec)
    records = host_tuning_device() if device == "host" else device
    rel = f"tvm/{device}.so"
    (path / "tvm").mkdir(exist_ok=True)
    try:
        info = export(policy, shape, int(manifest["model"]["num_heads"]), int(manifest["graphs"]["prefill_chunk"]),
                      target, str(path / rel), device=records)
    except (ValueError, RuntimeError) as e:  # unsupported geometry, missing cross compiler / nvcc
        raise EdgekvError(f"cannot compile TVM kernels for {device}: {e}") from None
    rels = [str(Path(f).relative_to(path)) for f in info["files"]]
    for r in rels:
        manifest["files"][r] = {"sha256": sha256(path / r), "bytes": (path / r).stat().st_size}
    manifest.setdefault("tvm", {})[device] = {
        "target": spec,
        "library": rel, "files": rels, "functions": info["functions"]}
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path / MANIFEST)
    return manifest["tvm"][device]


def add_compile(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("compile", help="add a device's TVM kernel library to a bundle (needs the tvm extra)",
                       description="Compile the bundle's pack and attention kernels with Apache TVM for "
                                   "DEVICE's target (cross-compiling for aarch64 / CUDA profiles) and "
                                   "add the library to the bundle's manifest.")
    p.add_argument("bundle", help="bundle directory made by `edgekv export`")
    p.add_argument("--device", required=True, help="device profile name (devices/*.json) or 'host'")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    entry = compile_bundle(args.bundle, args.device)
    print(f"{args.device}: {', '.join(entry['files'])} ({len(entry['functions'])} kernels)")
    return 0
