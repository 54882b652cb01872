"""Open an edgekv bundle and check it before anything is allocated.

A bundle (export/bundle.py) is a directory: manifest.json plus the files it lists with
their sha256 and size. Opening checks, in order: the manifest parses, its format
version is one this runtime reads, every listed file exists with the listed size and
hash, the graphs parse as ONNX, and the cache tensor list agrees with the policy. Each
failure is a BundleError that names the file and says what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgekv.bundle_format import FORMAT_VERSION, MANIFEST
from edgekv.errors import EdgekvError, PolicyError
from edgekv.files import sha256
from edgekv.key_feedback import KeyFeedback
from edgekv.policy import CachePolicy, KVShape
from edgekv.runtime.onnx_proto import ExternalTensor, ProtoError, external_initializers

GRAPHS = ("decode", "prefill", "pack")


class BundleError(EdgekvError):
    """A bundle that is missing, corrupted, or from an incompatible edgekv version."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    policy: CachePolicy
    shape: KVShape

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def prefill_chunk(self) -> int:
        return int(self.manifest["graphs"]["prefill_chunk"])

    def graph_path(self, kind: str) -> Path:
        return self.path / self.manifest["graphs"][kind]

    @property
    def weights_path(self) -> Path:
        return self.path / "weights.bin"

    @property
    def weights_bytes(self) -> int:
        f = self.manifest["files"].get("weights.bin")
        return int(f["bytes"]) if f else 0

    @property
    def cache_tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every cache buffer, in graph input order."""
        return [(t["name"], tuple(t["shape"]), t["dtype"])
                for layer in self.manifest["cache"]["layers"] for t in layer["tensors"]]

    @property
    def cache_bytes(self) -> int:
        return int(self.manifest["cache"]["total_bytes"])

    def external_weights(self, kind: str) -> list[ExternalTensor]:
        """The initializers of a graph that live in weights.bin."""
        return external_initializers(self.graph_path(kind).read_bytes())


def read_manifest(path: str | Path) -> dict:
    """manifest.json of a bundle directory (or the file itself), format version checked."""
    path = Path(path)
    mpath = path if path.is_file() else path / MANIFEST
    if not path.exists():
        raise BundleError(f"bundle {path} does not exist")
    if not mpath.is_file():
        raise BundleError(f"{path} is not an edgekv bundle: {MANIFEST} is missing "
                          f"(create one with `edgekv export MODEL -o {path}`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); re-export the bundle") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        made_by = manifest.get("edgekv_version", "?") if isinstance(manifest, dict) else "?"
        hint = ("upgrade edgekv on this device" if isinstance(version, int) and version > FORMAT_VERSION
                else "re-export it with this edgekv version")
        raise BundleError(f"{mpath}: format_version {version!r} (made by edgekv {made_by}), "
                          f"this runtime reads format_version {FORMAT_VERSION}; {hint}")
    for key in ("model", "policy", "graphs", "cache", "files"):
        if key not in manifest:
            raise BundleError(f"{mpath} has no {key!r} section; re-export the bundle")
    return manifest


def manifest_policy(manifest: dict, directory: str | Path | None = None) -> tuple[CachePolicy, KVShape]:
    """The bundle's cache policy and shape; `directory`: the bundle, to load the key
    feedback matrices a manifest may name (policy.key_feedback, edgekv.key_feedback).
    Without it they stay unloaded: enough for planning, which only counts bytes."""
    p, m = manifest["policy"], manifest["model"]
    feedback = None
    if p.get("key_feedback") and directory is not None:  # bundles before it: nearest rounding
        try:
            feedback = KeyFeedback.load(Path(directory))
        except ValueError as e:
            raise BundleError(f"{e}; copy the whole bundle directory again or re-export") from None
    try:
        policy = CachePolicy(bits_k=p["bits_k"], bits_v=p["bits_v"], sinks=p["sinks"],
                             window=p["window"], block=p["block"], group=p["group"],
                             positions=p.get("positions", "cache"),
                             rotation=p.get("rotation", "none"),  # bundles before rotation: none
                             meta=p.get("meta", "fp16"),  # bundles before 8-bit metadata: fp16
                             residual=p.get("residual", "fp16"),  # before the 8-bit residual: fp16
                             clip=tuple(tuple(c) for c in p.get("clip", ())),  # before clipping: none
                             groups_v=tuple(p.get("groups_v", ())),  # absent: `group` everywhere
                             units=tuple((layer, tuple(heads)) for layer, heads in p.get("units", ())),
                             key_feedback=feedback)
        shape = KVShape(int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"]))
        policy.check_shape(shape)
    except (KeyError, TypeError, ValueError, PolicyError) as e:
        raise BundleError(f"manifest policy/model section is invalid ({e}); re-export the bundle") from None
    if policy.window is None:
        raise BundleError("manifest has no window: a device bundle needs a finite --window")
    return policy, shape


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle. verify=False skips the sha256 pass (sizes and graph
    structure are still checked); hashing a 500 MB weights file takes about a second."""
    path = Path(path)
    manifest = read_manifest(path)
    policy, shape = manifest_policy(manifest, path)
    files = manifest["files"]
    for kind in GRAPHS:
        name = manifest["graphs"].get(kind)
        if name not in files:
            raise BundleError(f"manifest lists no file for the {kind} graph ({name!r}); re-export")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle file {name} is missing from {path}; copy the whole "
                              f"bundle directory again or re-export")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise BundleError(f"bundle file {name} is {size} bytes but the manifest says "
                              f"{info['bytes']} (truncated or replaced); copy it again or re-export")
        if verify and sha256(f) != info["sha256"]:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest "
                              f"(corrupted or modified); copy it again or re-export")
    bundle = Bundle(path, manifest, policy, shape)
    _check_graphs(bundle)
    _check_cache_list(bundle)
    return bundle


def _check_graphs(bundle: Bundle) -> None:
    weights = bundle.weights_bytes
    for kind in GRAPHS:
        name = bundle.manifest["graphs"][kind]
        try:
            tensors = bundle.external_weights(kind)
        except ProtoError as e:
            raise BundleError(f"{name} is not a valid ONNX model ({e}); the file is truncated "
                              f"or corrupted, re-export the bundle") from None
        for t in tensors:
            if t.location != "weights.bin" or t.offset + t.length > weights:
                raise BundleError(f"{name}: weight {t.name} points outside weights.bin "
                                  f"({t.location} @ {t.offset}+{t.length}); re-export the bundle")


def _check_cache_list(bundle: Bundle) -> None:
    expect = [(f"past.{i}.{t.name}", t.shape, t.dtype) for i in range(bundle.policy.num_units)
              for t in bundle.policy.layer_tensors(bundle.shape, i)]
    if bundle.cache_tensors != expect:
        raise BundleError("manifest cache tensors do not match its policy (edited manifest or "
                          "an incompatible exporter); re-export the bundle")
