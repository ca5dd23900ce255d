"""batchnorm: per-channel batch normalization with PyTorch's semantics (``BatchNorm1d/2d``).

Training normalizes each channel with the statistics of the whole mini-batch
(all images and positions, the biased variance), then scales by ``weight``
and shifts by ``bias``; the running statistics (state, not parameters) move
by ``momentum`` towards the batch mean and the unbiased batch variance after
each step. Outside training the running statistics normalize.

At inference a batchnorm that follows a conv or dense is folded into that
layer's weight and bias (``cnnc.passes.fold``); code generation lowers the
rest with the ``batchnorm`` kernel family (``cnnc.codegen.batchnorm``).
"""

from __future__ import annotations

import numpy as np

from cnnc.errors import CnnError
from cnnc.ir import Arg, OpDef
from cnnc.ops.common import fail, fmt, layer


def _check(args: dict, loc) -> None:
    if not 0.0 <= args["momentum"] <= 1.0:
        raise CnnError(f"batchnorm: momentum must be in [0, 1], got {args['momentum']}", loc)
    if not args["eps"] > 0.0:
        raise CnnError(f"batchnorm: eps must be > 0, got {args['eps']}", loc)


def _shape(node: dict, ins: list) -> tuple:
    if len(ins[0]) not in (1, 3):
        fail(node, f"{layer(node)}: input {fmt(ins[0])} is neither a vector nor a CxHxW feature map")
    return ins[0]


def channels(shape) -> int:
    """The normalized channels: C of CxHxW, the features of a vector."""
    return shape[0]


def _per_channel(node: dict, ins: list) -> dict:
    c = channels(ins[0])
    return {"weight": (c,), "bias": (c,)}


def _state(node: dict, ins: list) -> dict:
    c = channels(ins[0])
    return {"running_mean": (c,), "running_var": (c,)}


def _axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel one: the batch and, for maps, the positions."""
    return (0, *range(2, x.ndim))


def _bcast(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1, *([1] * (x.ndim - 2)))


def batch_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance over the batch (and positions), float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(axis=_axes(x)), x.var(axis=_axes(x))


def running_update(mean: np.ndarray, var: np.ndarray, count: int, running_mean: np.ndarray,
                   running_var: np.ndarray, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's update: r <- (1 - momentum) r + momentum * batch, with the unbiased variance (count / (count - 1))."""
    unbiased = var * (count / max(count - 1, 1))
    return ((1.0 - momentum) * running_mean + momentum * mean,
            (1.0 - momentum) * running_var + momentum * unbiased)


def reference(node: dict, ins: list, layer: dict) -> np.ndarray:
    """y = (x - mean) / sqrt(var + eps) * weight + bias; batch statistics in training, running ones otherwise."""
    x = ins[0]
    if layer.get("training"):
        mean, var = batch_moments(x)
    else:
        mean, var = layer["running_mean"], layer["running_var"]
    xhat = (x - _bcast(mean, x)) / np.sqrt(_bcast(var, x) + node["args"]["eps"])
    return xhat * _bcast(layer["weight"], x) + _bcast(layer["bias"], x)


def reference_grad(node: dict, ins: list, y: np.ndarray, dy: np.ndarray, layer: dict) -> tuple[list, dict]:
    """The gradient through the batch statistics in training; the per-channel affine map's otherwise.

    With m values per channel, xhat = (x - mean) * istd:
    dx = weight * istd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    """
    x = ins[0]
    axes = _axes(x)
    w = layer["weight"]
    if layer.get("training"):
        mean, var = batch_moments(x)
    else:
        mean, var = layer["running_mean"], layer["running_var"]
    istd = 1.0 / np.sqrt(var + node["args"]["eps"])
    xhat = (x - _bcast(mean, x)) * _bcast(istd, x)
    dweight, dbias = (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
    k = _bcast(w * istd, x)
    if layer.get("training"):
        m = x.size // x.shape[1]
        dx = k * (dy - _bcast(dbias / m, x) - xhat * _bcast(dweight / m, x))
    else:
        dx = k * dy
    return [dx], {"weight": dweight, "bias": dbias}


def scale_shift(weight, bias, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel affine map y = x * scale + shift that a batchnorm with these statistics is."""
    scale = weight / np.sqrt(var + eps)
    return scale, bias - mean * scale


BATCHNORM = OpDef(
    name="batchnorm",
    args=(Arg("momentum", "float", 0.1, "how far the running statistics move each step"),
          Arg("eps", "float", 1e-5, "added to the variance")),
    check=_check,
    shape=_shape,
    has_params=True,
    params=_per_channel,
    state=_state,
    init={"weight": "ones", "bias": "zeros", "running_mean": "zeros", "running_var": "ones"},
    decay=(),
    lowering="batchnorm",
    reference=reference,
    reference_grad=reference_grad,
    doc="per-channel batch normalization (PyTorch's BatchNorm1d/2d); state running_mean, running_var",
)
