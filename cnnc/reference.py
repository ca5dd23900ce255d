"""A plain numpy, float64 interpreter of a checked graph: the independent oracle of the native code.

``cnnc gradcheck`` differentiates it by central differences to check the
native gradients, and the tests compare the native forward pass with it. It is
written for clarity, not speed: each op is a few numpy lines, looked up in
``FORWARD`` by the op's name.

Conventions (the language reference): conv weights ``(out, in/groups, kh,
kw)`` applied as a cross-correlation; ``pads`` are (top, bottom, left, right);
max pooling pads with -inf, average pooling with zeros that count (divisor
kh*kw); a ``connect`` table masks the conv weight; dropout is the identity
unless a mask is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from cnnc.ir import execution_order
from cnnc.passes.autodiff import loss_input

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu")


def connect_mask(connect, shape) -> np.ndarray:
    """(out, in) of 0/1 from a table's rows."""
    mask = np.zeros(tuple(shape[:2]))
    for o, row in enumerate(connect):
        mask[o, list(row)] = 1.0
    return mask


def windows(xp: np.ndarray, k, stride, oh: int, ow: int) -> np.ndarray:
    """(N, C, kh, kw, oh, ow) patches of a padded (N, C, H, W) array."""
    n, c = xp.shape[:2]
    kh, kw = k
    sh, sw = stride
    cols = np.empty((n, c, kh, kw, oh, ow), dtype=xp.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
    return cols


def pad(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    pt, pb, pl, pr = pads
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def conv_weight(node, w: np.ndarray) -> np.ndarray:
    connect = node["args"].get("connect")
    return w * connect_mask(connect, w.shape)[:, :, None, None] if connect is not None else w


def conv_forward(node, x, w, b):
    geo, a = node["geometry"], node["args"]
    w = conv_weight(node, w)
    g = a["groups"]
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    cols = windows(pad(x, geo["pads"]), (kh, kw), a["stride"], geo["oh"], geo["ow"])
    colsg = cols.reshape(n, g, cg, kh, kw, geo["oh"], geo["ow"])
    y = np.einsum("ngcijhw,gocij->ngohw", colsg, w.reshape(g, o // g, cg, kh, kw)).reshape(n, o, geo["oh"], geo["ow"])
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def pool_forward(node, x):
    geo = node["geometry"]
    if node["op"] == "global_avgpool":
        return x.mean(axis=(2, 3))
    kh, kw = geo["k"]
    if node["op"] == "maxpool":
        return windows(pad(x, geo["pads"], -np.inf), geo["k"], geo["stride"], geo["oh"], geo["ow"]).max(axis=(2, 3))
    cols = windows(pad(x, geo["pads"]), geo["k"], geo["stride"], geo["oh"], geo["ow"])
    return cols.sum(axis=(2, 3)) / (kh * kw)


def activation_forward(op: str, x, alpha: float = 0.01):
    if op == "relu":
        return np.maximum(x, 0.0)
    if op == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if op == "tanh":
        return np.tanh(x)
    if op == "leaky_relu":
        return np.where(x > 0, x, alpha * x)
    raise ValueError(op)


def softmax(x, axis: int = 1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def param(params: Mapping[str, np.ndarray], name: str):
    return np.asarray(params[name], dtype=np.float64) if name in params else None


def _dense(n, node, ins, params, masks):
    y = ins[0] @ param(params, f"{n}.weight").T
    b = param(params, f"{n}.bias")
    return y if b is None else y + b


# op -> f(node name, node, input values, params, dropout masks) -> output value
FORWARD: dict[str, Callable] = {
    "conv": lambda n, node, ins, p, m: conv_forward(node, ins[0], param(p, f"{n}.weight"), param(p, f"{n}.bias")),
    "dense": _dense,
    "maxpool": lambda n, node, ins, p, m: pool_forward(node, ins[0]),
    "avgpool": lambda n, node, ins, p, m: pool_forward(node, ins[0]),
    "global_avgpool": lambda n, node, ins, p, m: pool_forward(node, ins[0]),
    "flatten": lambda n, node, ins, p, m: ins[0].reshape(ins[0].shape[0], -1),
    "softmax": lambda n, node, ins, p, m: softmax(ins[0], axis=1),
    "dropout": lambda n, node, ins, p, m: ins[0] * m[n] if m and n in m else ins[0],
    "add": lambda n, node, ins, p, m: sum(ins[1:], ins[0]),
    "concat": lambda n, node, ins, p, m: np.concatenate(ins, axis=1),
    **{a: (lambda n, node, ins, p, m: activation_forward(node["op"], ins[0], node["args"].get("alpha", 0.01)))
       for a in ACTIVATIONS},
}


def forward_values(g, params: Mapping[str, np.ndarray], x, masks: Mapping[str, np.ndarray] | None = None,
                   stop: str | None = None) -> dict[str, np.ndarray]:
    """Every node's value (N, *shape), float64. ``masks[dropout node]`` turns dropout on (y = x * mask)."""
    x = np.asarray(x, dtype=np.float64)
    inp = g.graph["input"]
    vals: dict[str, np.ndarray] = {inp: x.reshape(x.shape[0], *g.nodes[inp]["shape"])}
    for n in execution_order(g):
        node = g.nodes[n]
        if node["op"] == "input":
            continue
        y = FORWARD[node["op"]](n, node, [vals[i] for i in node["inputs"]], params, masks)
        assert y.shape[1:] == tuple(node["shape"]), (n, y.shape, node["shape"])
        vals[n] = y
        if n == stop:
            break
    return vals


def reference_forward(g, params: Mapping[str, np.ndarray], x, masks=None) -> np.ndarray:
    """The network's output for a batch, float64 (dropout is the identity unless `masks` are given)."""
    return forward_values(g, params, x, masks)[g.graph["output"]]


def loss_node(g, loss: str) -> str:
    """The tensor a loss reads: cross-entropy skips a final softmax."""
    return loss_input(g, loss)


def targets_for(y, n: int, k: int) -> np.ndarray:
    """mse targets: integer labels one-hot, real targets as (n, k)."""
    y = np.asarray(y)
    if y.dtype.kind in "iub":
        t = np.zeros((n, k))
        t[np.arange(n), y] = 1.0
        return t
    return np.asarray(y, dtype=np.float64).reshape(n, k)


def reference_loss(g, params, x, y, loss: str = "cross_entropy", masks=None) -> float:
    """The mean loss ``Model.value_and_grad`` reports, in float64."""
    z = forward_values(g, params, x, masks)[loss_node(g, loss)]
    n = z.shape[0]
    zf = z.reshape(n, -1)
    if loss == "cross_entropy":
        m = zf.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(zf - m).sum(axis=1, keepdims=True)))[:, 0]
        return float(np.mean(lse - zf[np.arange(n), np.asarray(y)]))
    return float(np.mean((zf - targets_for(y, n, zf.shape[1])) ** 2))
