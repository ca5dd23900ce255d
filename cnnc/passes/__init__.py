"""Passes over the IR graph, in the order they run. Each is a plain function graph -> graph."""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx

from cnnc.passes.autodiff import autodiff
from cnnc.passes.counts import count
from cnnc.passes.fold import fold
from cnnc.passes.fuse import fuse
from cnnc.passes.prune import prune
from cnnc.passes.shapes import infer_shapes

Pass = Callable[[nx.DiGraph], nx.DiGraph]

# What `cnnc check` runs: the graph as written, with shapes and counts.
CHECK: list[tuple[str, Pass]] = [("prune", prune), ("shapes", infer_shapes), ("counts", count)]
# What code generation needs after that.
OPTIMIZE: list[tuple[str, Pass]] = [("fuse", fuse), ("autodiff", autodiff), ("fold", fold)]
PIPELINE = CHECK + OPTIMIZE
PASS_NAMES = [name for name, _ in PIPELINE]


def run_passes(g: nx.DiGraph, passes: list[tuple[str, Pass]], after: Callable[[str, nx.DiGraph], None] | None = None):
    """Run `passes` in order; `after(name, graph)` sees the graph after each (``--dump-after``)."""
    for name, fn in passes:
        g = fn(g)
        if after is not None:
            after(name, g)
    return g
