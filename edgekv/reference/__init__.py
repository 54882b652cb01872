"""PyTorch reference backend: the numerical oracle for the exporter and the kernels.

Needs torch (the `export` extra); the runtime never imports this package.
"""
