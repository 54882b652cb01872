"""Evaluation text. The default is the glossary of the Jargon File 4.4.7 (public domain,
Debian package jargon-text): a slice is shipped in edgekv/data so a fresh machine needs no
download. Evaluation reads from the start; calibration (later work) must read from
`calibration_text`, which never overlaps it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from edgekv.errors import EdgekvError

DEFAULT_TEXT_NAME = "jargon-4.4.7-glossary.txt"
DEFAULT_TEXT_SOURCE = "The Jargon File 4.4.7, glossary (public domain; Debian package jargon-text)"
CALIBRATION_START = 0.75  # the last quarter of the shipped slice is reserved for calibration


def default_text() -> str:
    return resources.files("edgekv").joinpath("data", DEFAULT_TEXT_NAME).read_text(encoding="utf-8")


def evaluation_text() -> str:
    t = default_text()
    return t[: int(len(t) * CALIBRATION_START)]


def calibration_text() -> str:
    t = default_text()
    return t[int(len(t) * CALIBRATION_START):]


def read_text(path: str | None) -> tuple[str, str]:
    """(text, description) for --text PATH, or the default evaluation text."""
    if path is None:
        return evaluation_text(), DEFAULT_TEXT_SOURCE
    p = Path(path)
    if not p.is_file():
        raise EdgekvError(f"text file {path!r} does not exist")
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except UnicodeDecodeError:
        raise EdgekvError(f"text file {path!r} is not UTF-8") from None
