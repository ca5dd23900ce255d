"""The front end: .cnn text -> parse tree -> IR graph."""

from __future__ import annotations

import networkx as nx

from cnnc.errors import Diagnostics
from cnnc.frontend.lower import lower
from cnnc.frontend.parse import parse


def load_graph(source: str, path: str = "<string>", diag: Diagnostics | None = None) -> nx.DiGraph:
    """Parse and lower one .cnn text into its (unchecked) IR graph."""
    return lower(parse(source, path), diag)


__all__ = ["load_graph"]
