"""edgekv.tvm_kernels: Apache TVM kernels over the cache format (pack, fused
dequantize-attention), tuned per device. Lands with the TVM issue; empty for now."""
