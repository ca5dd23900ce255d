"""A plain numpy, float64 interpreter of a checked graph: the independent oracle of the native code.

``cnnc gradcheck`` differentiates it by central differences to check the
native gradients, and the tests compare the native forward pass with it. It is
written for clarity, not speed: each op's few numpy lines are its
``reference`` in the op table (``cnnc.ops.OPS``).

Conventions (the language reference): conv weights ``(out, in/groups, kh,
kw)`` applied as a cross-correlation; ``pads`` are (top, bottom, left, right);
max pooling pads with -inf, average pooling with zeros that count (divisor
kh*kw); a ``connect`` table masks the conv weight; dropout is the identity
unless a mask is given.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cnnc.ir import execution_order
from cnnc.ops import ACTIVATIONS, OPS
from cnnc.ops.common import pad, windows
from cnnc.ops.conv import masked_weight as conv_weight
from cnnc.ops.simple import softmax
from cnnc.passes.autodiff import loss_input
from cnnc_runtime.artifact import connect_mask
from cnnc_runtime.losses import DEFAULT_LOSS

__all__ = ["ACTIVATIONS", "connect_mask", "conv_weight", "forward_values", "layer_arrays", "pad", "param",
           "reference_backward", "reference_forward", "reference_loss", "softmax", "targets_for", "windows"]


def param(params: Mapping[str, np.ndarray], name: str):
    return np.asarray(params[name], dtype=np.float64) if name in params else None


STATE = ("running_mean", "running_var")


def layer_arrays(name: str, params: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray] | None,
                 training: bool = False) -> dict:
    """What an op's reference reads besides its inputs: its weight, bias, state (``params`` may hold
    ``NAME.running_mean`` ...) and dropout mask (None when absent), and whether it is training."""
    arrays = {"weight": param(params, f"{name}.weight"), "bias": param(params, f"{name}.bias"),
              "mask": masks.get(name) if masks else None, "training": training}
    arrays.update({kind: param(params, f"{name}.{kind}") for kind in STATE})
    return arrays


def forward_values(g, params: Mapping[str, np.ndarray], x, masks: Mapping[str, np.ndarray] | None = None,
                   stop: str | None = None, training: bool = False) -> dict[str, np.ndarray]:
    """Every node's value (N, *shape), float64. ``masks[dropout node]`` turns dropout on (y = x * mask);
    `training` normalizes batchnorm with the batch's statistics (else its running ones, from `params`)."""
    x = np.asarray(x, dtype=np.float64)
    inp = g.graph["input"]
    vals: dict[str, np.ndarray] = {inp: x.reshape(x.shape[0], *g.nodes[inp]["shape"])}
    for n in execution_order(g):
        node = g.nodes[n]
        if node["op"] == "input":
            continue
        y = OPS[node["op"]].reference(node, [vals[i] for i in node["inputs"]], layer_arrays(n, params, masks, training))
        assert y.shape[1:] == tuple(node["shape"]), (n, y.shape, node["shape"])
        vals[n] = y
        if n == stop:
            break
    return vals


def reference_backward(g, params, vals: dict, start: str, dstart: np.ndarray, masks=None, training: bool = False):
    """Gradients of all parameters (zeros for frozen ones) and of the input, given d(loss)/d(`start`).

    Reverse execution order from `start`; each op's ``reference_grad`` gives the gradients of its
    inputs and parameters; a tensor read by several ops receives the sum.
    """
    order = execution_order(g)
    order = order[:order.index(start) + 1]
    grads = {f"{n}.{k}": np.zeros(s) for n in g.nodes for k, s in g.nodes[n].get("params", {}).items()}
    d: dict[str, np.ndarray] = {start: dstart}
    for n in reversed(order):
        node = g.nodes[n]
        if n not in d or node["op"] == "input":
            continue
        ins = node["inputs"]
        dxs, dparams = OPS[node["op"]].reference_grad(node, [vals[i] for i in ins], vals[n], d[n],
                                                      layer_arrays(n, params, masks, training))
        if "fixed" not in node:
            grads.update({f"{n}.{k}": v for k, v in dparams.items() if f"{n}.{k}" in grads})
        for i, dx in zip(ins, dxs):
            d[i] = d[i] + dx if i in d else dx
    return grads, d.get(g.graph["input"])


def reference_forward(g, params: Mapping[str, np.ndarray], x, masks=None, training: bool = False) -> np.ndarray:
    """The network's output for a batch, float64 (dropout is the identity unless `masks` are given)."""
    return forward_values(g, params, x, masks, training=training)[g.graph["output"]]


def targets_for(y, n: int, k: int) -> np.ndarray:
    """mse targets: integer labels one-hot, real targets as (n, k)."""
    y = np.asarray(y)
    if y.dtype.kind in "iub":
        t = np.zeros((n, k))
        t[np.arange(n), y] = 1.0
        return t
    return np.asarray(y, dtype=np.float64).reshape(n, k)


def _cross_entropy(z: np.ndarray, y) -> float:
    n = z.shape[0]
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(n), np.asarray(y)]))


def _mse(z: np.ndarray, y) -> float:
    return float(np.mean((z - targets_for(y, z.shape[0], z.shape[1])) ** 2))


# The mean loss of (n, k) outputs, for each loss of ``cnnc_runtime.losses.LOSSES``.
LOSS_REFERENCES = {"cross_entropy": _cross_entropy, "mse": _mse}


def reference_loss(g, params, x, y, loss: str = DEFAULT_LOSS, masks=None, training: bool = True) -> float:
    """The mean loss ``Model.value_and_grad`` reports, in float64 (batchnorm in training mode)."""
    z = forward_values(g, params, x, masks, training=training)[loss_input(g, loss)]
    return LOSS_REFERENCES[loss](z.reshape(z.shape[0], -1), y)
