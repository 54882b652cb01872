"""edgekv.export: model loading (HF directory, GGUF file, the embedded default model)
and, later, tracing the compressed-cache graphs into an ONNX bundle. Needs torch."""
