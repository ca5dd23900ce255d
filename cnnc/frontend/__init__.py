"""The front end: .cnn text -> parse tree -> IR graph."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from cnnc.errors import CnnError, Diagnostics
from cnnc.frontend.lower import lower
from cnnc.frontend.parse import parse


def read_source(path: str | Path) -> str:
    """The text of a .cnn file; unreadable or non-UTF-8 files are user errors, not tracebacks."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CnnError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def load_graph(source: str, path: str = "<string>", diag: Diagnostics | None = None) -> nx.DiGraph:
    """Parse and lower one .cnn text into its (unchecked) IR graph."""
    return lower(parse(source, path), diag)
