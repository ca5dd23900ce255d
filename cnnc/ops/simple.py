"""Ops without parameters: the input, activations, flatten, softmax, dropout, add and concat."""

from __future__ import annotations

import math

from cnnc.ir import Arg, OpDef
from cnnc.ops.common import fail, fmt, layer

same = lambda node, ins: ins[0]


def _add_shape(node: dict, ins: list) -> tuple:
    if any(s != ins[0] for s in ins):
        listed = ", ".join(f"{n} is {fmt(s)}" for n, s in zip(node["inputs"], ins))
        fail(node, f"{layer(node)}: inputs must have the same shape, but {listed}")
    return ins[0]


def _concat_shape(node: dict, ins: list) -> tuple:
    ranks = {len(s) for s in ins}
    if ranks == {1}:
        return (sum(s[0] for s in ins),)
    if ranks == {3} and len({s[1:] for s in ins}) == 1:
        return (sum(s[0] for s in ins), *ins[0][1:])
    listed = ", ".join(f"{n} is {fmt(s)}" for n, s in zip(node["inputs"], ins))
    fail(node, f"{layer(node)}: inputs must agree in all but the channels, but {listed}")


INPUT = OpDef(name="input", args=(), shape=lambda node, ins: node["args"]["shape"], doc="the network's input")
FLATTEN = OpDef(name="flatten", args=(), shape=lambda node, ins: (math.prod(ins[0]),),
                doc="CxHxW -> C*H*W, channel then row then column (no copy)")
RELU = OpDef(name="relu", args=(), shape=same, activation=True, doc="max(x, 0)")
SIGMOID = OpDef(name="sigmoid", args=(), shape=same, activation=True, doc="1 / (1 + e^-x)")
TANH = OpDef(name="tanh", args=(), shape=same, activation=True, doc="hyperbolic tangent")
LEAKY_RELU = OpDef(name="leaky_relu", args=(Arg("alpha", "float", 0.01),), shape=same, activation=True,
                   doc="x if x > 0 else alpha x")
SOFTMAX = OpDef(name="softmax", args=(), shape=same, doc="over channels; for inference (losses have their own)")
DROPOUT = OpDef(name="dropout", args=(Arg("p", "prob", doc="drop probability"),), shape=same,
                doc="zeroes a fraction p while training, scaling the rest by 1/(1-p); identity otherwise")
ADD = OpDef(name="add", args=(), shape=_add_shape, multi_input=True, doc="element-wise sum")
CONCAT = OpDef(name="concat", args=(), shape=_concat_shape, multi_input=True, doc="join along channels")
