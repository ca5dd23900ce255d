"""Where cnnc keeps what it can compute again: compiled networks and what LLVM said about this CPU."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CNNC_CACHE_DIR``, else ``$XDG_CACHE_HOME/cnnc``, else ``~/.cache/cnnc``."""
    if os.environ.get("CNNC_CACHE_DIR"):
        return Path(os.environ["CNNC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnc"
