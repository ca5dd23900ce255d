"""Batchnorm folding: the inference graph, where a batchnorm after a conv or dense is part of that layer.

At inference a batchnorm is a per-channel affine map, y = x * s + t with
s = weight / sqrt(running_var + eps) and t = bias - running_mean * s; after a
conv or dense it folds into that layer: W' = W * s (per output channel) and
b' = (b - running_mean) * s + bias. The folded layer then runs as one kernel
with the activation that followed the batchnorm, and inference costs nothing
extra. The weights change as the network trains, so the fold itself happens
at run time (the ``fold`` entry point, ``cnnc.codegen.module``); this pass only
decides the inference graph's shape: ``g.graph["inference"]``, a copy where
each folded batchnorm is gone and its layer carries ``bn`` (the batchnorm's
name), ``bias`` set, and the batchnorm's fused activation. Batchnorms after
anything else stay and run unfolded (scale and shift per channel). Where the
training graph's activations were fused, the inference graph's adds are too
(``cnnc.passes.fuse``).
"""

from __future__ import annotations

import copy

import networkx as nx

from cnnc.ir import absorb, execution_order
from cnnc.passes.fuse import INFERENCE_FUSABLE, fuse

FOLDS_INTO = ("conv", "dense")


def foldable(g: nx.DiGraph, bn: str) -> bool:
    """A batchnorm whose input is a conv or dense read by nothing else (and not itself the output)."""
    src = g.nodes[bn]["inputs"][0]
    node = g.nodes[src]
    return (node["op"] in FOLDS_INTO and node.get("act", "none") == "none" and g.graph["output"] != src
            and list(g.successors(src)) == [bn])


def fold(g: nx.DiGraph) -> nx.DiGraph:
    """Attach the inference graph (``g.graph["inference"]``); `g` itself, the training graph, is unchanged."""
    inf = copy.deepcopy(g)
    for bn in execution_order(g):
        if g.nodes[bn]["op"] != "batchnorm" or not foldable(inf, bn):
            continue
        bnode = inf.nodes[bn]
        layer = bnode["inputs"][0]
        node = inf.nodes[layer]
        node["bn"] = bn
        node["own_bias"] = node["args"]["bias"]
        node["args"] = {**node["args"], "bias": True}
        node["params"] = {**node["params"], "bias": (node["shape"][0],)}
        for key in ("act", "act_args"):
            if key in bnode:
                node[key] = bnode[key]
        node["fused"] = [*node.get("fused", []), bn, *bnode.get("fused", [])]
        node["shape"] = bnode["shape"]
        absorb(inf, layer, bn)
    if g.graph.get("fused"):
        fuse(inf, INFERENCE_FUSABLE)
    g.graph["inference"] = inf
    return g
