"""conv: 2-D convolution with stride, padding, groups, dilation, connection tables and written weights."""

from __future__ import annotations

import math

import numpy as np

from cnnc.errors import CnnError
from cnnc.ir import Arg, OpDef
from cnnc.ops.common import (
    fail,
    fmt,
    layer,
    need_image,
    pad,
    resolve_padding,
    unwindows,
    window_output,
    windows,
)
from cnnc_runtime.artifact import connect_mask


def _check(args: dict, loc) -> None:
    if args["weights"] is None and (args["out"] is None or args["k"] is None):
        missing = "out" if args["out"] is None else "k"
        what = "the number of output channels" if missing == "out" else "the kernel size"
        raise CnnError(f"conv needs '{missing}' ({what}), e.g. conv(6, 5x5)", loc)
    if args["connect"] is not None and args["groups"] != 1:
        raise CnnError("conv: 'connect' and 'groups' cannot be used together", loc)


def _weights4(node: dict) -> np.ndarray:
    w = node["args"]["weights"]
    if w.ndim > 4:
        fail(node, f"{layer(node)}: written weights have {w.ndim} dimensions; at most 4 (out x in x kh x kw)")
    return w.reshape((1,) * (4 - w.ndim) + w.shape)


def _out_and_kernel(node: dict) -> tuple[int, tuple[int, int]]:
    a = node["args"]
    if a["weights"] is None:
        return a["out"], a["k"]
    w = _weights4(node)
    return (a["out"] if a["out"] is not None else w.shape[0]), (a["k"] if a["k"] is not None else w.shape[2:])


def shape(node: dict, ins: list) -> tuple:
    c, h, w = need_image(node, ins[0])
    a = node["args"]
    out, k = _out_and_kernel(node)
    groups = a["groups"]
    if c % groups:
        fail(node, f"{layer(node)}: {c} input channels cannot be split into {groups} groups")
    if out % groups:
        fail(node, f"{layer(node)}: {out} output channels cannot be split into {groups} groups")
    if a["connect"] is not None:
        for row, (channels, row_loc) in enumerate(zip(a["connect"], a["connect_locs"])):
            for ch in channels:
                if ch >= c:
                    raise CnnError(
                        f"table {a['connect_name']}: row {row} reads input channel {ch}, "
                        f"but {layer(node)} has only {c} input channels (0..{c - 1})", row_loc)
    if a["weights"] is not None:
        expected = (out, c // groups, k[0], k[1])
        got = _weights4(node).shape
        if got != expected:
            fail(node, f"{layer(node)}: written weights have shape {fmt(a['weights'].shape)}; "
                       f"expected {fmt(expected)} (out x in x kh x kw; leading 1s may be left out)")
    span = dilated(k, a["dilation"])
    pads = resolve_padding(node, a["pad"], (h, w), span, a["stride"])
    what = "kernel" if span == tuple(k) else f"kernel ({fmt(k)} dilated by {fmt(a['dilation'])})"
    oh, ow = window_output(node, (c, h, w), span, a["stride"], pads, what)
    node["geometry"] = {"out": out, "k": tuple(k), "pads": pads, "oh": oh, "ow": ow}
    return out, oh, ow


def dilated(k: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """The rows and columns a dilated kernel spans: d (k - 1) + 1, so out = floor((in + 2p - d(k-1) - 1)/s) + 1."""
    return tuple(d * (n - 1) + 1 for n, d in zip(k, dilation))


def params(node: dict, ins: list) -> dict:
    g = node["geometry"]
    c = ins[0][0]
    p = {"weight": (g["out"], c // node["args"]["groups"], *g["k"])}
    if node["args"]["bias"]:
        p["bias"] = (g["out"],)
    return p


def count_params(node: dict) -> int:
    a, g = node["args"], node["geometry"]
    if a["connect"] is None:
        return sum(math.prod(s) for s in node["params"].values())
    links = sum(len(row) for row in a["connect"])
    return links * g["k"][0] * g["k"][1] + (g["out"] if a["bias"] else 0)


def macs(node: dict, ins: list) -> int:
    a, g = node["args"], node["geometry"]
    per_output = g["k"][0] * g["k"][1] * g["oh"] * g["ow"]
    if a["connect"] is not None:
        return sum(len(row) for row in a["connect"]) * per_output
    return g["out"] * (ins[0][0] // a["groups"]) * per_output


def masked_weight(node: dict, w: np.ndarray) -> np.ndarray:
    """The weight with the entries outside a connect table zeroed."""
    connect = node["args"].get("connect")
    return w * connect_mask(connect, w.shape)[:, :, None, None] if connect is not None else w


def _columns(node: dict, x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """(N, groups, C/groups, kh, kw, oh, ow): the input pixel each tap of each output reads."""
    geo, a = node["geometry"], node["args"]
    cols = windows(pad(x, geo["pads"]), (kh, kw), a["stride"], geo["oh"], geo["ow"], a["dilation"])
    return cols.reshape(x.shape[0], a["groups"], x.shape[1] // a["groups"], kh, kw, geo["oh"], geo["ow"])


def reference(node: dict, ins: list, layer: dict) -> np.ndarray:
    """Cross-correlation of (N, C, H, W) with weight (out, in/groups, kh, kw), plus the bias."""
    w, b, x = masked_weight(node, layer["weight"]), layer["bias"], ins[0]
    g = node["args"]["groups"]
    o, cg, kh, kw = w.shape
    y = np.einsum("ngcijhw,gocij->ngohw", _columns(node, x, kh, kw), w.reshape(g, o // g, cg, kh, kw))
    y = y.reshape(x.shape[0], o, *y.shape[-2:])
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def reference_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    geo, a = node["geometry"], node["args"]
    w, x = masked_weight(node, layer["weight"]), ins[0]
    g = a["groups"]
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    dyg = dy.reshape(n, g, o // g, geo["oh"], geo["ow"])
    dw = np.einsum("ngohw,ngcijhw->gocij", dyg, _columns(node, x, kh, kw)).reshape(w.shape)
    dcols = np.einsum("ngohw,gocij->ngcijhw", dyg, w.reshape(g, o // g, cg, kh, kw))
    padded = pad(x, geo["pads"]).shape
    dx = unwindows(dcols.reshape(n, c, kh, kw, geo["oh"], geo["ow"]), padded, a["stride"], geo["pads"], h, wd,
                   a["dilation"])
    return [dx], {"weight": masked_weight(node, dw), "bias": dy.sum(axis=(0, 2, 3))}


CONV = OpDef(
    name="conv",
    args=(
        Arg("out", "count", None, "output channels"),
        Arg("k", "size", None, "kernel size, 5 or 5x5"),
        Arg("stride", "size", 1),
        Arg("pad", "pad", 0, "an int, HxW, same or valid"),
        Arg("groups", "count", 1),
        Arg("dilation", "size", 1, "spacing of the kernel taps, 2 or 2x2"),
        Arg("connect", "table", None, "a table of which input channels each output reads"),
        Arg("bias", "bool", True),
        Arg("weights", "weights", None, "fixed weights written in the file"),
    ),
    check=_check,
    has_params=True,
    shape=shape,
    params=params,
    count_params=count_params,
    macs=macs,
    lowering="conv",
    reference=reference,
    reference_grad=reference_grad,
    doc="2-D convolution, weight (out, in/groups, kh, kw)",
)
