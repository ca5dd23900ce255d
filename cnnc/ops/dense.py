"""dense: a fully connected layer on a flat input."""

from __future__ import annotations

import numpy as np

from cnnc.ir import Arg, OpDef
from cnnc.ops.common import fail, fmt, layer


def shape(node: dict, ins: list) -> tuple:
    if len(ins[0]) != 1:
        fail(node, f"{layer(node)}: input {fmt(ins[0])} is not flat; write 'flatten' before 'dense'")
    return (node["args"]["out"],)


def params(node: dict, ins: list) -> dict:
    out = node["args"]["out"]
    p = {"weight": (out, ins[0][0])}
    if node["args"]["bias"]:
        p["bias"] = (out,)
    return p


def reference(node: dict, ins: list, layer: dict) -> np.ndarray:
    y = ins[0] @ layer["weight"].T
    return y if layer["bias"] is None else y + layer["bias"]


def reference_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    return [dy @ layer["weight"]], {"weight": dy.T @ ins[0], "bias": dy.sum(axis=0)}


DENSE = OpDef(
    name="dense",
    args=(Arg("out", "count", doc="output features"), Arg("bias", "bool", True)),
    shape=shape,
    has_params=True,
    params=params,
    macs=lambda node, ins: ins[0][0] * node["args"]["out"],
    lowering="dense",
    reference=reference,
    reference_grad=reference_grad,
    doc="y = x W^T + b, weight (out, in)",
)
