"""The intermediate representation: a networkx graph of operations, and the op table.

Graph (``networkx.DiGraph``), one node per operation, keyed by its unique name.
Node attributes:

========== ==================================================================
op         name of an entry of ``OPS`` (``"conv"``, ``"relu"``, ``"input"`` ...)
name       the layer's name (same as the node key); parameters are ``name.weight``, ``name.bias``
inputs     node names of the inputs, in argument order (edges repeat this for networkx)
args       the layer's arguments after defaults and checks (sizes are ``(h, w)`` tuples)
loc        ``Loc`` of the layer in the source, for error messages
binding    the ``NAME =`` binding the layer belongs to (for the summary)
shape      output shape without the batch, e.g. ``(6, 28, 28)`` or ``(10,)`` (shape inference)
geometry   op-specific derived sizes, e.g. resolved padding (shape inference)
params     ``{"weight": shape, "bias": shape}`` (shape inference; empty for ops without)
state      ``{"running_mean": shape, ...}``: saved, never trained (shape inference; batchnorm)
fixed      ``{"weight": ndarray}`` for weights written in the file; such layers are frozen
macs       multiply-accumulates for one image (counting pass)
act        activation fused into a conv/dense node (fusion pass), default ``"none"``
act_args   that activation's arguments after defaults, e.g. ``{"alpha": 0.01}`` (fusion pass)
fused      names of the activation nodes folded into this one (fusion pass)
========== ==================================================================

Edges ``u -> v`` carry ``ports``: the argument positions of ``u`` among ``v``'s inputs.
The graph's own attributes hold ``network`` (its name), ``output`` (the output
node), ``input`` (the input node), ``source`` (file name), ``train`` (the train
section as a plain dict) and ``tables``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx

REQUIRED = object()

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Arg:
    """One argument of a layer: its name, value kind (see ``cnnc.frontend.values``) and default."""

    name: str
    kind: str
    default: Any = REQUIRED
    doc: str = ""


@dataclass(frozen=True)
class OpDef:
    """Everything cnnc knows about one operation, found from its name (the op table is ``cnnc.ops.OPS``).

    ``args`` are its arguments in positional order, with their defaults;
    ``doc`` says in one line what it computes (and its weight layout).
    ``has_params``: the layer has parameters (the front end numbers such
    layers for their default names); ``multi_input``: it joins named tensors
    and so starts a chain (``add``, ``concat``). ``check(args, loc)`` rejects
    argument combinations when the layer is read; ``shape(node,
    input_shapes) -> shape`` checks the inputs and may record derived sizes in
    ``node["geometry"]``; ``params(node, input_shapes)`` gives parameter
    shapes; ``state(node, input_shapes)`` the shapes of state that is saved
    with the weights but never trained (batchnorm's running statistics);
    ``init`` maps parameter and state kinds to ``"ones"`` or ``"zeros"``
    (None: fan-in scaled normal weights, zero biases); ``decay`` the parameter
    kinds weight decay applies to; ``macs(node, input_shapes)`` counts
    multiply-accumulates for one image; ``count_params(node)`` overrides the product of the parameter
    shapes (a ``connect`` table). ``reference(node, inputs, layer)`` is the
    float64 forward on batches (``layer``: the ``weight``, ``bias``, state and
    dropout ``mask`` arrays, None when absent, and ``training``) and ``reference_grad(node,
    inputs, y, dy, layer) -> (input gradients, {"weight": ..., "bias": ...})``
    its gradient rule. ``lowering`` names the kernel family that emits its
    forward and backward code (``cnnc.codegen.lowering.FAMILIES``); ``act`` is
    the ``cnnc.ops.activations.Activation`` of an activation (None for other
    ops): its kernels, derivative, initialisation rule and fused arguments.
    """

    name: str
    args: tuple[Arg, ...]
    shape: Callable[[dict, list[Shape]], Shape]
    params: Callable[[dict, list[Shape]], dict[str, Shape]] = lambda node, ins: {}
    macs: Callable[[dict, list[Shape]], int] = lambda node, ins: 0
    check: Callable[[dict, Any], None] = lambda args, loc: None
    count_params: Callable[[dict], int] | None = None
    has_params: bool = False
    multi_input: bool = False
    state: Callable[[dict, list[Shape]], dict[str, Shape]] = lambda node, ins: {}
    init: dict[str, str] | None = None
    decay: tuple[str, ...] = ("weight",)
    lowering: str = ""
    reference: Callable[..., Any] | None = None
    reference_grad: Callable[..., Any] | None = None
    act: Any = None
    doc: str = ""

    @property
    def activation(self) -> bool:
        """An element-wise activation: fusion may fold it into the conv or dense layer before it."""
        return self.act is not None

    def arg(self, name: str) -> Arg | None:
        return next((a for a in self.args if a.name == name), None)


def new_graph(network: str, source: str) -> nx.DiGraph:
    g = nx.DiGraph()
    g.graph.update(network=network, source=source, output=None, input=None, train={}, tables={})
    return g


def add_node(g: nx.DiGraph, name: str, op: str, inputs: list[str], **attrs: Any) -> None:
    """Add an operation node and its input edges (an input used twice gets two ports)."""
    g.add_node(name, name=name, op=op, inputs=list(inputs), **attrs)
    for port, src in enumerate(inputs):
        if g.has_edge(src, name):
            g.edges[src, name]["ports"].append(port)
        else:
            g.add_edge(src, name, ports=[port])


def absorb(g: nx.DiGraph, into: str, name: str) -> None:
    """Remove node `name`, whose work `into` (its producer) now does: its readers read `into` instead."""
    for succ in list(g.successors(name)):
        snode = g.nodes[succ]
        snode["inputs"] = [into if i == name else i for i in snode["inputs"]]
        g.add_edge(into, succ, ports=g.edges[name, succ]["ports"])
    if g.graph["output"] == name:
        g.graph["output"] = into
    g.remove_node(name)


def covers_input(g: nx.DiGraph, name: str) -> bool:
    """A conv whose kernel covers its whole unpadded input (LeNet's C5) is a dense layer on the flattened input.

    The weight (out, c, h, w) flattened row by row is the dense weight (out, c*h*w),
    and the batched dense kernels beat a per-image convolution with one output pixel.
    """
    node = g.nodes[name]
    c, h, w = g.nodes[node["inputs"][0]]["shape"]
    geo, a = node["geometry"], node["args"]
    return (geo["k"] == (h, w) and geo["pads"] == (0, 0, 0, 0) and a["groups"] == 1 and a["connect"] is None
            and a["dilation"] == (1, 1))


def execution_order(g: nx.DiGraph) -> list[str]:
    """Nodes in a topological order that keeps source order where it is free (stable, deterministic)."""
    index = {n: i for i, n in enumerate(g.nodes)}
    return list(nx.lexicographical_topological_sort(g, key=lambda n: index[n]))


def input_shapes(g: nx.DiGraph, name: str) -> list[Shape]:
    return [g.nodes[i]["shape"] for i in g.nodes[name]["inputs"]]
