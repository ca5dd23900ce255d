"""Fusion: conv or dense + bias + activation become one kernel (and batchnorm + activation).

The activation is applied in registers before the store, so the
pre-activation tensor is never written. A layer is fused with the activation
that is its only consumer; its pre-activation output must not be used
anywhere else (nor be the network's output).
"""

from __future__ import annotations

import networkx as nx

from cnnc.ir import absorb, execution_order
from cnnc.ops import OPS

FUSABLE = ("conv", "dense", "batchnorm")


def fuse(g: nx.DiGraph) -> nx.DiGraph:
    """Fold each fusable activation into its producer; the fused node takes over the activation's consumers."""
    for name in execution_order(g):
        if name not in g or g.nodes[name]["op"] not in FUSABLE or g.graph["output"] == name:
            continue
        consumers = list(g.successors(name))
        if len(consumers) != 1:
            continue
        act = consumers[0]
        anode = g.nodes[act]
        if not OPS[anode["op"]].activation or g.nodes[name].get("act", "none") != "none":
            continue
        node = g.nodes[name]
        node["act"] = anode["op"]
        node["act_args"] = dict(anode.get("args", {}))  # all of them: the kernel specs carry every one
        node["fused"] = [*node.get("fused", []), act]
        node["shape"] = anode["shape"]
        absorb(g, name, act)
    return g
