"""maxpool, avgpool and global_avgpool."""

from __future__ import annotations

from cnnc.ir import Arg, OpDef
from cnnc.ops.common import fail, fmt, layer, need_image, resolve_padding, window_output


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


_POOL_ARGS = (
    Arg("k", "size", doc="window, 2 or 2x2"),
    Arg("stride", "size", None, "defaults to the window"),
    Arg("pad", "pad", 0),
)

MAXPOOL = OpDef(name="maxpool", args=_POOL_ARGS, shape=shape, doc="maximum over each window")
AVGPOOL = OpDef(name="avgpool", args=_POOL_ARGS, shape=shape, doc="mean over each window (padding counts as 0)")
GLOBAL_AVGPOOL = OpDef(name="global_avgpool", args=(), shape=global_shape, doc="mean of each channel: CxHxW -> C")
