"""`edgekv profile`: latency and memory of bundles and baselines, side by side (report
table, JSON/CSV, plots, --compare). Torch-free except the hf baseline's worker; the
measurement itself is edgekv.runtime.profiler."""
