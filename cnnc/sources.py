"""Reading .cnn files (kept apart from the front end so that a cached compile imports no parser)."""

from __future__ import annotations

import os
from pathlib import Path

from cnnc.errors import CnnError


def read_source(path: str | os.PathLike[str]) -> str:
    """The text of a .cnn file; unreadable or non-UTF-8 files are user errors, not tracebacks."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CnnError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
