"""Ops without parameters: the input, flatten, the activations (``cnnc.ops.activations``), softmax,
dropout, add and concat."""

from __future__ import annotations

import math

import numpy as np

from cnnc.ir import Arg, OpDef
from cnnc.ops.activations import TABLE, Activation
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


def softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    return [y * (dy - (dy * y).sum(axis=1, keepdims=True))], {}


def _dropout(node: dict, ins: list, layer: dict) -> np.ndarray:
    return ins[0] if layer["mask"] is None else ins[0] * layer["mask"]


def _dropout_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    return [dy if layer["mask"] is None else dy * layer["mask"]], {}


def _concat_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    ends = np.cumsum([x.shape[1] for x in ins])
    return [dy[:, end - x.shape[1]:end] for x, end in zip(ins, ends)], {}


def activation(act: Activation) -> OpDef:
    """The layer of an activation: shape-preserving, lowered by the element-wise kernels."""
    return OpDef(
        name=act.name, args=act.args, shape=same, check=act.check, lowering="activation", act=act, doc=act.doc,
        reference=lambda node, ins, layer: act.reference(ins[0], node["args"]),
        reference_grad=lambda node, ins, y, dy, layer: ([dy * act.derivative(ins[0], y, node["args"])], {}),
    )


INPUT = OpDef(name="input", args=(), shape=lambda node, ins: node["args"]["shape"], lowering="input",
              doc="the network's input")
FLATTEN = OpDef(name="flatten", args=(), shape=lambda node, ins: (math.prod(ins[0]),), lowering="view",
                reference=lambda node, ins, layer: ins[0].reshape(ins[0].shape[0], -1),
                reference_grad=lambda node, ins, y, dy, layer: ([dy.reshape(ins[0].shape)], {}),
                doc="CxHxW -> C*H*W, channel then row then column (no copy)")
ACTIVATIONS = tuple(activation(act) for act in TABLE.values())
SOFTMAX = OpDef(name="softmax", args=(), shape=same, lowering="softmax",
                reference=lambda node, ins, layer: softmax(ins[0]), reference_grad=_softmax_grad,
                doc="over channels; for inference (losses have their own)")
DROPOUT = OpDef(name="dropout", args=(Arg("p", "prob", doc="drop probability"),), shape=same, lowering="dropout",
                reference=_dropout, reference_grad=_dropout_grad,
                doc="zeroes a fraction p while training, scaling the rest by 1/(1-p); identity otherwise")
ADD = OpDef(name="add", args=(), shape=_add_shape, multi_input=True, lowering="add",
            reference=lambda node, ins, layer: sum(ins[1:], ins[0]),
            reference_grad=lambda node, ins, y, dy, layer: ([dy] * len(ins), {}), doc="element-wise sum")
CONCAT = OpDef(name="concat", args=(), shape=_concat_shape, multi_input=True, lowering="concat",
               reference=lambda node, ins, layer: np.concatenate(ins, axis=1), reference_grad=_concat_grad,
               doc="join along channels")
