"""Shape inference: every node's output shape and parameter shapes, checked against its inputs."""

from __future__ import annotations

import networkx as nx

from cnnc.ir import execution_order, input_shapes
from cnnc.ops import OPS


def infer_shapes(g: nx.DiGraph) -> nx.DiGraph:
    """Fill ``shape``, ``geometry`` and ``params`` on every node, in execution order.

    A layer that cannot take its input raises ``CnnError`` naming the layer,
    the shape it got and why (``conv c5: input 16x4x4 is smaller than the 5x5 kernel``).
    """
    for name in execution_order(g):
        node = g.nodes[name]
        op = OPS[node["op"]]
        ins = input_shapes(g, name)
        node.setdefault("geometry", {})
        node["shape"] = tuple(op.shape(node, ins))
        node["params"] = op.params(node, ins)
    return g
