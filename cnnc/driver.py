"""From source text to a checked (and optionally optimised) graph: the front half of every command."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import networkx as nx

from cnnc.errors import Diagnostics
from cnnc.frontend import load_graph, read_source
from cnnc.passes import CHECK, OPTIMIZE, run_passes


def check_source(source: str, path: str = "<string>", diag: Diagnostics | None = None,
                 after: Callable[[str, nx.DiGraph], None] | None = None) -> nx.DiGraph:
    """Parse, lower, prune, infer shapes and count: the graph `cnnc check` reports on."""
    return run_passes(load_graph(source, path, diag), CHECK, after)


def check_file(path: str | Path, diag: Diagnostics | None = None) -> nx.DiGraph:
    return check_source(read_source(path), str(path), diag)


def optimize(checked: nx.DiGraph, after: Callable[[str, nx.DiGraph], None] | None = None,
             skip: tuple[str, ...] = ()) -> nx.DiGraph:
    """The passes after checking (fusion, ...), on a copy so the checked graph stays as written.

    `skip` names passes to leave out (``("fuse",)`` gives the unfused code, for comparison).
    """
    return run_passes(copy.deepcopy(checked), [(n, p) for n, p in OPTIMIZE if n not in skip], after)
