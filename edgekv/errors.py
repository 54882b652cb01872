"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class EdgekvError(Exception):
    """Base class: every message says what was wrong and what to do instead."""


class PolicyError(EdgekvError, ValueError):
    """An invalid cache policy (bits, window, block, group, sinks)."""


class ModelLoadError(EdgekvError):
    """A model path that does not exist or cannot be read."""


class UnsupportedModelError(EdgekvError):
    """A model whose architecture edgekv does not handle yet."""
