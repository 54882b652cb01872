"""One shared library per (bundle, device): every kernel a policy needs, compiled for the
device's target (cross-compiled where the host is not the device) and exported.

Function names are stable so a loader finds them from the policy alone (`kernel_names`):
  pack_k_b{bits}, pack_v_b{bits}        one residual block -> ring slot
  decode_k{bk}_v{bv}, prefill_k{bk}_v{bv}  attention (one query / one prefill chunk)
each with the suffix `_r8`, `_r8h` or `_r8hr` for an 8-bit sink/residual (policy.residual
"u8", "u8h", "u8hr"; edgekv.policy.residual_suffix), whose
kernels take other buffers, and after the widths `_gv{G}` for ring values grouped by a
value group other than policy.group (policy.groups_v; params.group_suffix).
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass

import tvm

from edgekv.policy import CachePolicy, KVShape, residual_suffix
from edgekv.tvm_kernels.build import compile_module, cuda_source, nvcc_fatbin, scheduled_attention, scheduled_pack
from edgekv.tvm_kernels.params import attn_params, group_suffix, kernel_key, pack_key, pack_params
from edgekv.tvm_kernels.targets import is_gpu

# gcc driver per cross triple (Debian's gcc-<triple> packages).
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc"}


@dataclass(frozen=True)
class KernelSet:
    decode: dict[tuple[int, ...], str]  # by params.kernel_key: (bits_k, bits_v, value group[, KV heads])
    prefill: dict[tuple[int, ...], str]
    pack: dict[tuple[str, int, int], str]  # (side, bits, value group; policy.group for keys)


def _heads_suffix(key: tuple[int, ...]) -> str:
    """A split layer's unit kernels say their KV head count (kernel_key's 4th entry)."""
    return f"_h{key[3]}" if len(key) > 3 else ""


def kernel_names(policy: CachePolicy, num_kv_heads: int) -> KernelSet:
    layers = range(policy.num_units)
    keys = sorted({kernel_key(policy, i, num_kv_heads) for i in layers})
    # The pack kernels neither rotate, clip, round with key feedback nor write 8-bit metadata
    # yet: such a bundle packs with pack.onnx (as every backend does today), and its library
    # holds attention kernels only.
    plain = (policy.rotation == "none" and policy.meta == "fp16" and not policy.clip
             and policy.key_feedback is None)
    packed = {pack_key(policy, i, side) for i in layers for side in "kv"}
    packs = [] if not plain else sorted(k for k in packed if k[1] < 16)
    r, g = residual_suffix(policy.residual), policy.group
    return KernelSet({key: f"decode_k{key[0]}_v{key[1]}{group_suffix(g, key[2])}{r}{_heads_suffix(key)}" for key in keys},
                     {key: f"prefill_k{key[0]}_v{key[1]}{group_suffix(g, key[2])}{r}{_heads_suffix(key)}" for key in keys},
                     {pk: f"pack_{pk[0]}_b{pk[1]}{group_suffix(g, pk[2])}{r}" for pk in packs})


def build_module(policy: CachePolicy, shape: KVShape, num_heads: int, chunk: int,
                 target: tvm.target.Target, device: str | None = None) -> tvm.IRModule:
    """All kernels of the policy, scheduled for `target`, in one IRModule."""
    names = kernel_names(policy, shape.num_kv_heads)
    funcs = {}
    for key, name in names.decode.items():
        layer = next(i for i in range(policy.num_units) if kernel_key(policy, i, shape.num_kv_heads) == key)
        for ch, nm in ((1, name), (chunk, names.prefill[key])):
            p = attn_params(policy, shape, layer, num_heads, chunk=ch)
            funcs[nm] = scheduled_attention(p, target, device).with_attr("global_symbol", nm)
    for key, name in names.pack.items():
        side = key[0]
        layer = next(i for i in range(policy.num_units) if pack_key(policy, i, side) == key)
        funcs[name] = scheduled_pack(pack_params(policy, shape, layer, side), side, target).with_attr("global_symbol", name)
    return tvm.IRModule(funcs)


def _host_arch(target: tvm.target.Target) -> str:
    host = target.host if is_gpu(target) and target.host is not None else target
    triple = str(host.attrs.get("mtriple", "")) or platform.machine()
    return triple.split("-")[0]


def fcompile_for(target: tvm.target.Target):
    """The linker for the target's host CPU: the system compiler natively, a cross gcc
    otherwise (None: use TVM's default)."""
    arch = _host_arch(target)
    if arch in ("", platform.machine()):
        return None
    cc = CROSS_CC.get(arch)
    if cc is None or shutil.which(cc) is None:
        raise RuntimeError(f"no cross compiler for {arch} (install {cc or 'one'}, e.g. apt-get install gcc-{arch}-linux-gnu)")
    from tvm.support import cc as _cc
    return _cc.cross_compiler(cc)


def export(policy: CachePolicy, shape: KVShape, num_heads: int, chunk: int,
           target: tvm.target.Target, path: str, device: str | None = None) -> dict[str, object]:
    """Compile and write the library to `path` (plus `path`.fatbin, nvcc's build of the
    device code, for CUDA targets). Returns the files written and the function names."""
    mod = build_module(policy, shape, num_heads, chunk, target, device)
    lib = compile_module(mod, target)
    fcompile = fcompile_for(target)
    if fcompile is None:
        lib.export_library(path)
    else:
        lib.export_library(path, fcompile=fcompile)
    files = [path]
    if target.kind.name == "cuda":
        with open(path + ".fatbin", "wb") as f:
            f.write(nvcc_fatbin(cuda_source(lib), target))
        files.append(path + ".fatbin")
    return {"files": files, "functions": sorted(str(gv.name_hint) for gv in mod.get_global_vars())}
