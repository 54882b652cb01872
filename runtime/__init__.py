"""edgekv.runtime: the embedded runtime that ships to a device (numpy + onnxruntime, never
torch). The Engine lands with the runtime issue; today the package holds nothing, so that
the layout and the no-torch import rule are in place from the start."""
