"""Fusion: conv or dense + bias + activation become one kernel (and batchnorm + activation).

The activation is applied in registers before the store, so the
pre-activation tensor is never written. A layer is fused with the activation
that is its only consumer; its pre-activation output must not be used
anywhere else (nor be the network's output). The inference graph (``fold``)
also fuses an add of two tensors with its activation (a residual block's
``add -> relu``: one pass over the floats instead of two); training keeps
them apart, since the add's gradient has no activation to go through.
"""

from __future__ import annotations

import networkx as nx

from cnnc.ir import absorb, execution_order
from cnnc.ops import OPS

FUSABLE = ("conv", "dense", "batchnorm")
INFERENCE_FUSABLE = ("add",)  # (two inputs: see ``fusable``)


def fusable(g: nx.DiGraph, name: str, ops: tuple[str, ...]) -> bool:
    node = g.nodes[name]
    return node["op"] in ops and g.graph["output"] != name and (node["op"] != "add" or len(node["inputs"]) == 2)


def fuse(g: nx.DiGraph, ops: tuple[str, ...] = FUSABLE) -> nx.DiGraph:
    """Fold each fusable activation into its producer (one of `ops`); the fused node takes over the activation's
    consumers. Marks `g` (``graph["fused"]``) so that ``fold`` fuses the inference graph's adds too."""
    g.graph["fused"] = True
    for name in execution_order(g):
        if name not in g or not fusable(g, name, ops):
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
