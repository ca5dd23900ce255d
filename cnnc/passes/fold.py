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
(``cnnc.passes.fuse``), and then a conv whose only reader is an add of two
tensors does that add (``fuse_residuals``): a residual block's last conv
writes ``act(conv * s + t + shortcut)`` in its epilogue, and the add's pass
over three tensors (ResNet-20 at batch 1: 9 of them, about 5% of an image's
time) is gone.
"""

from __future__ import annotations

import copy

import networkx as nx

from cnnc.ir import absorb, covers_input, execution_order
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
        fuse_residuals(inf)
    g.graph["inference"] = inf
    return g


def _residual_conv(g: nx.DiGraph, add: str, order: dict[str, int]) -> str | None:
    """The input of `add` (two distinct inputs of its shape) that can take it over: a conv with no activation of
    its own, read by `add` alone, not the output, not run as a dense layer; the later one (in `order`) when both
    can."""
    inputs = g.nodes[add]["inputs"]
    if len(inputs) != 2 or inputs[0] == inputs[1]:
        return None
    shape = g.nodes[add]["shape"]
    ok = [src for src in inputs
          if g.nodes[src]["op"] == "conv" and g.nodes[src].get("act", "none") == "none"
          and list(g.successors(src)) == [add] and g.graph["output"] != src and not covers_input(g, src)
          and all(g.nodes[i]["shape"] == shape for i in inputs)]
    return max(ok, key=order.__getitem__) if ok else None


def fuse_residuals(g: nx.DiGraph) -> nx.DiGraph:
    """Let each conv that only feeds an add of two tensors do that add (and its fused activation): the conv's
    second input is the other addend (``residual``), added to its outputs before the activation."""
    order = execution_order(g)
    position = {n: i for i, n in enumerate(order)}
    for add in order:
        if add not in g or g.nodes[add]["op"] != "add":
            continue
        conv = _residual_conv(g, add, position)
        if conv is None:
            continue
        anode, node = g.nodes[add], g.nodes[conv]
        other = next(i for i in anode["inputs"] if i != conv)
        node["inputs"] = [*node["inputs"], other]
        if g.has_edge(other, conv):  # (the conv's own input: a block of one conv)
            g.edges[other, conv]["ports"].append(1)
        else:
            g.add_edge(other, conv, ports=[1])
        node["residual"] = other
        node["act"] = anode.get("act", "none")
        node["act_args"] = dict(anode.get("act_args", {}))
        node["fused"] = [*node.get("fused", []), add, *anode.get("fused", [])]
        node["shape"] = anode["shape"]
        absorb(g, conv, add)
    return g
