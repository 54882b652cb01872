"""edgekv.tvm_kernels: Apache TVM kernels over the cache format (needs the `tvm` extra).

params.py     CachePolicy layer -> kernel parameters (the one mapping)
pack.py       quantize + pack one block (TE), bit exact with edgekv.quant/packing
attention.py  fused dequantize-attention, decode and causal prefill chunk (TE)
rope.py       host-side RoPE tables (numpy)
schedule_cpu.py, build.py   schedules (hand CPU rule, tuning records, dlight) and compile
library.py, compile_bundle.py   one library per device; `edgekv compile`
targets.py    TVM targets from device profiles
tune.py       MetaSchedule tuning of the CPU schedule's knobs
See docs/ARCHITECTURE.md, "TVM kernels".
"""
