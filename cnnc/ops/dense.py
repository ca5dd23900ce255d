"""dense: a fully connected layer on a flat input."""

from __future__ import annotations

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


DENSE = OpDef(
    name="dense",
    args=(Arg("out", "count", doc="output features"), Arg("bias", "bool", True)),
    shape=shape,
    has_params=True,
    params=params,
    macs=lambda node, ins: ins[0][0] * node["args"]["out"],
    doc="y = x W^T + b, weight (out, in)",
)
