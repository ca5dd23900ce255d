"""Autodiff: the backward graph of each loss, as the ordered list of gradient steps code generation emits.

Reverse-mode, as micrograd does it: walk the forward graph in reverse
execution order from the tensor the loss reads; each node that a gradient
reaches applies its op's gradient rule (``cnnc.codegen.lowering.BACKWARD``)
to get the gradients of its parameters (unless frozen) and of the inputs a
gradient must flow into; a tensor read by several nodes receives the sum.

A gradient flows into a tensor only when some layer with trainable
parameters lies at or upstream of it: nothing is computed for the input
image, or behind frozen (written-weight) layers.

Result: ``g.graph["backward"][loss] = [Step, ...]`` and
``g.graph["loss_input"][loss]``, for both losses (cross-entropy reads the
input of a final softmax, which applies its own softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from cnnc.ir import execution_order
from cnnc_runtime.losses import LOSSES


@dataclass(frozen=True)
class Step:
    """Differentiate node ``node``: parameter gradients if ``params``, input gradients for ``inputs``."""

    node: str
    params: bool
    inputs: tuple[str, ...]


def loss_input(g: nx.DiGraph, loss: str) -> str:
    """The tensor a loss reads: one that applies softmax itself (cross-entropy) skips a final softmax."""
    out = g.graph["output"]
    if LOSSES[loss].applies_softmax and g.nodes[out]["op"] == "softmax":
        return g.nodes[out]["inputs"][0]
    return out


def trainable(node: dict) -> bool:
    return bool(node.get("params")) and "fixed" not in node


def upstream_of_parameters(g: nx.DiGraph, order: list[str]) -> set[str]:
    """Tensors at or downstream of a trainable layer: the only ones whose gradient is worth computing."""
    flows: set[str] = set()
    for n in order:
        node = g.nodes[n]
        if trainable(node) or any(i in flows for i in node["inputs"]):
            flows.add(n)
    return flows


def autodiff(g: nx.DiGraph) -> nx.DiGraph:
    order = execution_order(g)
    flows = upstream_of_parameters(g, order)
    g.graph["backward"], g.graph["loss_input"] = {}, {}
    for loss in LOSSES:
        start = loss_input(g, loss)
        reached = {start}
        steps = []
        for n in reversed(order[:order.index(start) + 1]):
            node = g.nodes[n]
            if n not in reached or n not in flows:
                continue
            into = tuple(dict.fromkeys(i for i in node["inputs"] if i in flows))
            reached.update(into)
            steps.append(Step(n, trainable(node), into))
        g.graph["backward"][loss] = steps
        g.graph["loss_input"][loss] = start
    return g
