"""Reading .cnn files (kept apart from the front end so that a cached compile imports no parser)."""

from __future__ import annotations

import os
from pathlib import Path

from cnnc.errors import CnnError

MAX_SOURCE_BYTES = 64 << 20  # a .cnn file is text a person wrote; anything larger is a mistake


def read_source(path: str | os.PathLike[str]) -> str:
    """The text of a .cnn file; unreadable, huge or non-UTF-8 files are user errors (one line), not tracebacks."""
    try:
        if Path(path).is_dir():
            raise CnnError(f"{path}: is a directory, not a .cnn file")
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise CnnError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_SOURCE_BYTES:
        raise CnnError(f"{path}: larger than {MAX_SOURCE_BYTES >> 20} MiB; not a .cnn file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CnnError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
