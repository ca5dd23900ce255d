"""Shape inference: every node's output shape and parameter shapes, checked against its inputs."""

from __future__ import annotations

import math

import networkx as nx

from cnnc.errors import CnnError
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
        try:
            node["shape"] = tuple(op.shape(node, ins))
            node["params"] = op.params(node, ins)
            node["state"] = op.state(node, ins)
            check_sizes(node)
        except CnnError as e:
            raise e.note_block_uses(node.get("uses", ())) from None
    return g


MAX_TENSOR = 2**31 - 1  # elements in one tensor (8 GiB of float32): the kernels index tensors with 32-bit ints


def check_sizes(node: dict) -> None:
    """Refuse a layer whose output (for one image) or a parameter has more than MAX_TENSOR elements.

    Caught here, before anything is allocated or compiled, rather than as a
    MemoryError (or the OOM killer) later.
    """
    tensors = [("output", node["shape"]), *((f"{kind} parameter", shape) for kind, shape in node["params"].items())]
    for what, shape in tensors:
        if math.prod(shape) > MAX_TENSOR:
            dims = "x".join(map(str, shape))
            raise CnnError(f"{node['op']} {node['name']}: its {what} would have {math.prod(shape):,} elements "
                           f"({dims}); a tensor holds at most {MAX_TENSOR:,}", node.get("loc"))
