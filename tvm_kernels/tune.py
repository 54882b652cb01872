"""MetaSchedule tuning of the CPU attention schedule's knobs, records kept under
devices/tuning/<device>/ so a user never retunes.

The design space is schedule_cpu.attention with its knob sampled (the number of ring
partitions P.V is split into), searched by replaying traces with a random cost model:
small budgets, no xgboost. `tuned_schedule` looks a workload up; build.py uses it first,
then the hand schedule, then dlight / plain loops.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms

from edgekv.tvm_kernels import schedule_cpu
from edgekv.tvm_kernels.attention import attention_func
from edgekv.tvm_kernels.params import AttnParams


def records_dir(device: str) -> Path:
    return Path(str(resources.files("edgekv.devices"))) / "tuning" / device


def _database(path: Path) -> ms.database.JSONDatabase | None:
    wl, rec = path / "database_workload.json", path / "database_tuning_record.json"
    if not (wl.is_file() and rec.is_file()):
        return None
    return ms.database.JSONDatabase(str(wl), str(rec), allow_missing=False)


def tune_attention(p: AttnParams, target: tvm.target.Target, work_dir: str | Path, trials: int = 8):
    """Tune one attention workload; records are appended to work_dir's JSON database."""
    mod = tvm.IRModule({"main": attention_func(p)})

    def space(sch):
        schedule_cpu.attention(sch, p, target, sample=True)
        return sch

    # one build at a time with a long timeout: a 2-core machine shared with other jobs
    # takes well over MetaSchedule's default 30 s per build of this many-stage kernel
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=300)
    runner = ms.runner.LocalRunner(timeout_sec=60)
    return ms.tune_tir(mod, target, str(work_dir), max_trials_global=trials, num_trials_per_iter=trials,
                       space=ms.space_generator.ScheduleFn(space), strategy="replay-trace",
                       builder=builder, runner=runner, cost_model="random", num_tuning_cores=1)


def tuned_schedule(func, target: tvm.target.Target, device: str):
    """The best recorded schedule of `func` for `device`, or None (not tuned)."""
    db = _database(records_dir(device))
    if db is None:
        return None
    return db.query_schedule(tvm.IRModule({"main": func}), target, workload_name="main")


def main() -> None:
    """python -m edgekv.tvm_kernels.tune DEVICE --heads 9 --kv-heads 3 --head-dim 64 --bits 3
    [--window 1024 --sinks 4 --block 32 --group 32 --trials 8]: tune the decode kernel of
    that geometry and write the records to devices/tuning/DEVICE/ (commit them)."""
    import argparse

    from edgekv.tvm_kernels.targets import device_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("device")
    for name, default in (("heads", 9), ("kv-heads", 3), ("head-dim", 64), ("bits", 3), ("window", 1024),
                          ("sinks", 4), ("block", 32), ("group", 32), ("trials", 8), ("cores", 2)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    spec = device_spec(a.device)
    spec.setdefault("num-cores", a.cores)  # MetaSchedule needs it for llvm targets
    p = AttnParams(a.heads, a.kv_heads, a.head_dim, a.sinks, a.window // a.block, a.block, a.group, a.bits, a.bits, 1)
    out = records_dir(a.device)
    out.mkdir(parents=True, exist_ok=True)
    tune_attention(p, tvm.target.Target(spec), out, a.trials)


if __name__ == "__main__":
    main()
