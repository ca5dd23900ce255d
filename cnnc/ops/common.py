"""Helpers shared by the op definitions: error raising and shape arithmetic."""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from cnnc.errors import CnnError
from cnnc.ir import Shape


def fail(node: dict, message: str) -> NoReturn:
    """Raise a user error located at `node`'s layer."""
    raise CnnError(message, node.get("loc"))


def fmt(shape: Shape | tuple[int, int]) -> str:
    """1x32x32 style, as written in .cnn files."""
    return "x".join(str(d) for d in shape)


def layer(node: dict) -> str:
    """'conv c5': how messages name a layer."""
    return f"{node['op']} {node['name']}"


def need_image(node: dict, shape: Shape) -> tuple[int, int, int]:
    """The (C, H, W) of a feature-map input, or a clear error for a flat one."""
    if len(shape) != 3:
        fail(node, f"{layer(node)}: input {fmt(shape)} is flat; {node['op']} needs a CxHxW feature map")
    return shape  # type: ignore[return-value]


def resolve_padding(node: dict, pad, size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int]):
    """(top, bottom, left, right) padding for an int/HxW, 'valid' or 'same' pad argument.

    'same' pads so that the output is ceil(in / stride), splitting an odd total
    with the extra row/column at the bottom/right (TensorFlow's convention).
    """
    if pad == "valid":
        return 0, 0, 0, 0
    if pad == "same":
        out = []
        for n, k, s in zip(size, kernel, stride):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = pad
    return ph, ph, pw, pw


def window_output(node: dict, shape: Shape, kernel, stride, pads, what: str) -> tuple[int, int]:
    """Output height and width of a sliding window: floor((in + pads - k) / s) + 1."""
    c, h, w = shape
    pt, pb, pl, pr = pads
    if h + pt + pb < kernel[0] or w + pl + pr < kernel[1]:
        padded = f" (padded to {h + pt + pb}x{w + pl + pr})" if pt or pb or pl or pr else ""
        fail(node, f"{layer(node)}: input {fmt(shape)}{padded} is smaller than the {fmt(kernel)} {what}")
    return (h + pt + pb - kernel[0]) // stride[0] + 1, (w + pl + pr - kernel[1]) // stride[1] + 1


# ---- float64 reference helpers (numpy, on batches N x C x H x W) ----


def pad(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    pt, pb, pl, pr = pads
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def windows(xp: np.ndarray, k, stride, oh: int, ow: int, dilation=(1, 1)) -> np.ndarray:
    """(N, C, kh, kw, oh, ow) patches of a padded (N, C, H, W) array; tap (i, j) reads row i*dh, column j*dw."""
    n, c = xp.shape[:2]
    kh, kw = k
    sh, sw = stride
    dh, dw = dilation
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
    return cols


def unwindows(dcols: np.ndarray, padded_shape, stride, pads, h: int, w: int, dilation=(1, 1)) -> np.ndarray:
    """The adjoint of ``windows`` followed by cropping the padding."""
    kh, kw = dcols.shape[2:4]
    sh, sw = stride
    dh, dw = dilation
    oh, ow = dcols.shape[-2:]
    dxp = np.zeros(padded_shape)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] += dcols[:, :, i, j]
    pt, _, pl, _ = pads
    return dxp[:, :, pt:pt + h, pl:pl + w]
