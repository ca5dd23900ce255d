"""maxpool, avgpool and global_avgpool."""

from __future__ import annotations

import numpy as np

from cnnc.ir import Arg, OpDef
from cnnc.ops.common import fail, fmt, layer, need_image, pad, resolve_padding, unwindows, window_output, windows


def shape(node: dict, ins: list) -> tuple:
    c, h, w = need_image(node, ins[0])
    a = node["args"]
    k = a["k"]
    stride = a["stride"] or k
    pads = resolve_padding(node, a["pad"], (h, w), k, stride)
    if max(pads[0], pads[1]) > k[0] // 2 or max(pads[2], pads[3]) > k[1] // 2:
        fail(node, f"{layer(node)}: padding {fmt((max(pads[:2]), max(pads[2:])))} is more than half "
                   f"the {fmt(k)} window, so a window could see nothing but padding")
    oh, ow = window_output(node, (c, h, w), k, stride, pads, "window")
    node["geometry"] = {"k": tuple(k), "stride": tuple(stride), "pads": pads, "oh": oh, "ow": ow}
    return c, oh, ow


def global_shape(node: dict, ins: list) -> tuple:
    c, h, w = need_image(node, ins[0])
    node["geometry"] = {"k": (h, w), "stride": (h, w), "pads": (0, 0, 0, 0), "oh": 1, "ow": 1}
    return (c,)


def _windows(node: dict, x: np.ndarray, fill: float) -> np.ndarray:
    geo = node["geometry"]
    return windows(pad(x, geo["pads"], fill), geo["k"], geo["stride"], geo["oh"], geo["ow"])


def max_reference(node: dict, ins: list, layer: dict) -> np.ndarray:
    """Padding is -inf: it never wins."""
    return _windows(node, ins[0], -np.inf).max(axis=(2, 3))


def max_reference_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    """Each window's gradient goes to its first maximum in row-major order, or to its last NaN (as the kernels)."""
    geo, x = node["geometry"], ins[0]
    n, c, h, w = x.shape
    (kh, kw), oh, ow = geo["k"], geo["oh"], geo["ow"]
    cols = _windows(node, x, -np.inf).reshape(n, c, kh * kw, oh, ow)
    nan = np.isnan(cols)
    last_nan = kh * kw - 1 - nan[:, :, ::-1].argmax(axis=2)
    taken = np.where(nan.any(axis=2), last_nan, cols.argmax(axis=2))
    onehot = (np.arange(kh * kw)[None, None, :, None, None] == taken[:, :, None]).astype(np.float64)
    dcols = (onehot * dy[:, :, None]).reshape(n, c, kh, kw, oh, ow)
    return [unwindows(dcols, pad(x, geo["pads"]).shape, geo["stride"], geo["pads"], h, w)], {}


def avg_reference(node: dict, ins: list, layer: dict) -> np.ndarray:
    """Padded zeros count in the divisor kh * kw."""
    kh, kw = node["geometry"]["k"]
    return _windows(node, ins[0], 0.0).sum(axis=(2, 3)) / (kh * kw)


def avg_reference_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    geo, x = node["geometry"], ins[0]
    n, c, h, w = x.shape
    (kh, kw), oh, ow = geo["k"], geo["oh"], geo["ow"]
    dcols = np.broadcast_to(dy[:, :, None, None] / (kh * kw), (n, c, kh, kw, oh, ow))
    return [unwindows(dcols, pad(x, geo["pads"]).shape, geo["stride"], geo["pads"], h, w)], {}


def global_reference_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    x = ins[0]
    return [np.broadcast_to(dy[:, :, None, None] / (x.shape[2] * x.shape[3]), x.shape).copy()], {}


_POOL_ARGS = (
    Arg("k", "size", doc="window, 2 or 2x2"),
    Arg("stride", "size", None, "defaults to the window"),
    Arg("pad", "pad", 0),
)

MAXPOOL = OpDef(name="maxpool", args=_POOL_ARGS, shape=shape, lowering="pool", reference=max_reference,
                reference_grad=max_reference_grad, doc="maximum over each window")
AVGPOOL = OpDef(name="avgpool", args=_POOL_ARGS, shape=shape, lowering="pool", reference=avg_reference,
                reference_grad=avg_reference_grad, doc="mean over each window (padding counts as 0)")
GLOBAL_AVGPOOL = OpDef(name="global_avgpool", args=(), shape=global_shape, lowering="pool",
                       reference=lambda node, ins, layer: ins[0].mean(axis=(2, 3)),
                       reference_grad=global_reference_grad, doc="mean of each channel: CxHxW -> C")
