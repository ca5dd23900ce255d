"""Dead-layer removal: layers that do not lead to the output are not part of the network.

The front end has already warned about the unused bindings that hold them.
"""

from __future__ import annotations

import networkx as nx


def prune(g: nx.DiGraph) -> nx.DiGraph:
    keep = nx.ancestors(g, g.graph["output"]) | {g.graph["output"], g.graph["input"]}
    g.remove_nodes_from([n for n in list(g.nodes) if n not in keep])
    return g
