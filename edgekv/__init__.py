"""edgekv: LLMs on edge devices with a compressed KV cache inside a fixed memory budget."""

__version__ = "0.1.0"
