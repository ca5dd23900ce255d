"""A plain numpy (float64) reference for whole cnnc networks: forward, backward and the two losses.

The network is described by the checked graph of ``cnnc.pipeline.check_source``
(before fusion): nodes in ``cnnc.ir.execution_order(g)``, each with ``op``,
``inputs``, ``args``, ``geometry`` and ``shape``. Parameters are a mapping
``"NAME.weight" -> array`` (``model.params`` works as is).

- ``reference_forward(g, params, x)``: the inference output, float64.
- ``reference_value_and_grad(g, params, x, y, loss)``: what
  ``Model.value_and_grad`` computes (mean loss and parameter gradients;
  cross-entropy skips a final softmax; mse takes integer labels as one-hot).
- ``torch_forward(g, params, x)``: the same network written with
  ``torch.nn.functional`` (an independent oracle, used only when torch imports).
- ``build(text, ...)``: compile a network once per process (memoised, no
  on-disk cache, so a stale cache entry can never hide a code generation change)
  and return a fresh ``Model`` each call.

Conventions (LANGUAGE.md): conv weights ``(out, in/groups, kh, kw)`` applied as a
cross-correlation; ``pads`` are (top, bottom, left, right); max pooling pads with
-inf, average pooling pads with zeros that count (divisor kh*kw); a ``connect``
table masks the conv weight; dropout is the identity unless a mask is given.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cnnc.ir import execution_order
from cnnc.passes.autodiff import loss_input
from cnnc.reference import (  # the oracle's op rules live in the op table (cnnc gradcheck uses them)
    connect_mask,
    forward_values,
    reference_backward,
    softmax,
    targets_for,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# ---- the networks the runtime tests share (same text -> compiled once per process by ``build``) ----


RESNET = """
# stem, a residual block repeated twice, a strided 'same' conv (a second block), global pooling
block residual(c) {
    input x
    y   = x -> conv(c, 3x3, pad=same) -> relu -> conv(c, 3x3, pad=same)
    out = add(x, y) -> relu
}
block down(c, k = 3) {
    input x
    y = x -> conv(c, k, stride=2, pad=same) -> relu
}
network resnet {
    input image: 3x8x8
    stem   = image -> conv(4, 3x3, pad=same) -> relu
    stage1 = stem -> residual(4) * 2
    stage2 = stage1 -> down(8)
    logits = stage2 -> global_avgpool -> dense(5)
}
"""


LENET_MODERN = """
network lenet_modern {
    input image: 1x28x28
    c1     = image -> conv(6, 5x5, pad=same) -> relu      # 6@28x28
    s2     = c1 -> maxpool(2x2)                           # 6@14x14
    c3     = s2 -> conv(16, 5x5) -> relu                  # 16@10x10
    s4     = c3 -> maxpool(2x2)                           # 16@5x5
    f5     = s4 -> flatten -> dense(120) -> relu
    f6     = f5 -> dense(84) -> relu
    logits = f6 -> dense(10)
}
"""

MLP = """
network mlp {
    input pixels: 64
    h1     = pixels -> dense(32) -> relu -> dropout(0.2)
    h2     = h1 -> dense(16, bias=false) -> relu -> dropout(0.5)
    logits = h2 -> dense(10)
}
"""

# The MLP without its dropout layers: same parameter names and shapes.
MLP_NO_DROPOUT = """
network mlp {
    input pixels: 64
    h1     = pixels -> dense(32) -> relu
    h2     = h1 -> dense(16, bias=false) -> relu
    logits = h2 -> dense(10)
}
"""

VGG = """
block vgg(c) {
    input x
    y = x -> conv(c, 3x3, pad=same) -> relu -> conv(c, 3x3, pad=same) -> relu -> maxpool(2x2)
}
network vgg_small {
    input image: 3x16x16
    features = image -> vgg(4) -> vgg(8)                  # 8@4x4
    probs    = features -> flatten -> dense(10) -> softmax
}
"""

# a 3x3 conv with 16 channels in and out on a 16x16 map: Winograd F(2x2, 3x3), forward and input gradient
VGG_WIDE = """
network vgg_wide {
    input image: 3x16x16
    a     = image -> conv(16, 3x3, pad=same) -> relu -> conv(16, 3x3, pad=same) -> relu -> maxpool(2x2)
    probs = a -> flatten -> dense(10) -> softmax
}
"""

# concat of three branches, grouped convs, strided 'same' convs with even (4x4) and odd (5x5) kernels,
# an even 2x2 'same' conv (asymmetric padding), max and avg pooling with padding, leaky_relu, sigmoid,
# and a softmax over the channels of a feature map.
BRANCHES = """
network branches {
    input x: 4x9x9
    a  = x -> conv(6, 3x3, pad=same, groups=2) -> leaky_relu(alpha=0.1)   # 6@9x9
    b  = x -> conv(2, 4x4, stride=2, pad=same) -> sigmoid                  # 2@5x5, pads (1, 2)
    e  = x -> conv(2, 5x5, stride=2, pad=same) -> leaky_relu               # 2@5x5, pads (2, 2)
    a2 = a -> maxpool(3x3, stride=2, pad=1)                                # 6@5x5
    c  = concat(a2, b, e)                                                  # 10@5x5
    d  = c -> conv(4, 2x2, pad=same, groups=2) -> avgpool(3x3, stride=2, pad=1) -> softmax   # 4@3x3
}
"""

# No parameters at all: pooling with padding, concat.
POOLS = """
network pools {
    input x: 3x7x7
    a = x -> maxpool(3x3, stride=2, pad=1)      # 3@4x4
    b = x -> avgpool(2x2, pad=1)                # 3@4x4, padding counts (divisor 4)
    c = concat(a, b) -> avgpool(3, stride=1, pad=1)
}
"""

LAPLACIAN = "[[0, 1, 0], [1, -4, 1], [0, 1, 0]]"
SOBEL_X = "[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]"
FILTERS = f"""
network filters {{
    input image: 1x8x8
    edges = image -> conv(1, 3x3, pad=1, bias=false, weights={LAPLACIAN})
    grad  = image -> conv(1, 3x3, pad=1, bias=false, weights={SOBEL_X})
    out   = concat(edges, grad) -> conv(3, 3x3) -> tanh -> flatten -> dense(4)
}}
"""

# elu, gelu and silu fused into a padded 3x3 conv (Winograd), a strided (im2col) conv, a conv that covers its
# input (run as dense) and dense layers, and unfused after pooling and add; gelu and silu keep their input.
SMOOTH = """
network smooth {
    input x: 3x8x8
    a = x -> conv(4, 3x3, pad=same) -> gelu                  # 4@8x8
    b = x -> conv(4, 3x3, stride=2, pad=1) -> silu           # 4@4x4
    c = a -> maxpool(2x2) -> elu(alpha=0.5)                  # 4@4x4
    s = add(b, c) -> gelu -> silu                            # 4@4x4
    g = s -> conv(6, 4x4) -> silu                            # 6@1x1
    f = g -> flatten -> dense(10) -> gelu -> dense(6) -> elu -> dense(5)
}
"""

# dilated convolutions: 'same' padding, a stride, groups, a table, different dilations per axis
DILATED = """
table halves {
    0: 0 1
    1: 2 3
    2: 0 3
}
network dilated {
    input x: 2x11x11
    a = x -> conv(4, 3x3, pad=same, dilation=2) -> relu                     # 4@11x11
    b = a -> conv(4, 3x2, stride=2, pad=1, groups=2, dilation=2x3) -> tanh   # 4@5x5
    c = b -> conv(3, 2x2, dilation=3, connect=halves) -> elu                 # 3@2x2
    o = c -> flatten -> dense(5)
}
"""

# 6x6 images (a dataset's) are padded into its 8x8 input and normalized: the input rule's test network
PADDED = """
network padnet {
    input image: 1x8x8
    c = image -> conv(2, 3x3) -> tanh -> avgpool(2x2)
    y = c -> flatten -> dense(3)
}
train {
    normalize(mean=0.2, std=0.7)
}
"""

NETWORKS = {
    "lenet5": (EXAMPLES / "lenet5.cnn").read_text(),
    "lenet_modern": LENET_MODERN,
    "mlp": MLP,
    "vgg": VGG,
    "vgg_wide": VGG_WIDE,
    "resnet": RESNET,
    "branches": BRANCHES,
    "pools": POOLS,
    "filters": FILTERS,
    "smooth": SMOOTH,
    "dilated": DILATED,
}


# ---- compiling (memoised per process) -------------------------------------------------


def _compile_job(text: str, generic: bool, fuse: bool) -> tuple[dict, bytes]:
    from cnnc.codegen.target import generic_target, host_target
    from cnnc.pipeline import Build

    target = generic_target() if generic else host_target()
    c = Build(text, fuse=fuse).compiled(target, use_cache=False)
    return c.manifest, c.obj


_COMPILED: dict[tuple[str, bool, bool], tuple[dict, bytes]] = {}


def _compiled(text: str, generic: bool, fuse: bool) -> tuple[dict, bytes]:
    key = (text, generic, fuse)
    if key not in _COMPILED:
        _COMPILED[key] = _compile_job(text, generic, fuse)
    return _COMPILED[key]


def build(text: str, *, seed: int = 0, generic: bool = False, fuse: bool = True):
    """A fresh ``Model`` for `text` (the object code is compiled once per process and options)."""
    from cnnc_runtime.model import Model

    manifest, obj = _compiled(text, generic, fuse)
    return Model(copy.deepcopy(manifest), obj, seed=seed)


@functools.cache
def graph(text: str):
    """The checked graph of a network's source text."""
    from cnnc.pipeline import check_source

    return check_source(text)


def random_params(g, rng: np.random.Generator, scale: float = 0.5) -> dict[str, np.ndarray]:
    """Random weights and biases for every parameter (zero outside a connect table; written weights kept)."""
    out = {}
    for n in execution_order(g):
        node = g.nodes[n]
        for kind, shape in node.get("params", {}).items():
            fixed = node.get("fixed", {}).get(kind)
            if fixed is not None:
                out[f"{n}.{kind}"] = np.asarray(fixed, dtype=np.float64).reshape(shape)
                continue
            fan_in = int(np.prod(shape[1:])) if kind == "weight" else 1
            w = rng.standard_normal(shape) * (scale / np.sqrt(fan_in) if kind == "weight" else 0.3)
            if kind == "weight" and node["args"].get("connect") is not None:
                w = w * connect_mask(node["args"]["connect"], shape)[:, :, None, None]
            out[f"{n}.{kind}"] = w
    return out


# ---- the ops, forward and backward --------------------------------------------------


def reference_value_and_grad(g, params, x, y, loss: str = "cross_entropy", masks=None):
    """(mean loss, {param name: gradient}) as ``Model.value_and_grad`` defines them, in float64."""
    start = loss_input(g, loss)
    vals = forward_values(g, params, x, masks, training=True)
    z = vals[start]
    n = z.shape[0]
    zf = z.reshape(n, -1)
    k = zf.shape[1]
    y = np.asarray(y)
    if loss == "cross_entropy":
        m = zf.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(zf - m).sum(axis=1, keepdims=True)))[:, 0]
        value = float(np.mean(lse - zf[np.arange(n), y]))
        dz = softmax(zf, axis=1)
        dz[np.arange(n), y] -= 1.0
        dz /= n
    else:
        t = targets_for(y, n, k)
        value = float(np.mean((zf - t) ** 2))
        dz = 2.0 * (zf - t) / (n * k)
    grads, _ = reference_backward(g, params, vals, start, dz.reshape(z.shape), masks, training=True)
    return value, grads


# ---- the same networks in torch (an independent oracle) ------------------------------------


def _torch_activations() -> dict:
    """op -> f(tensor, args): each activation as PyTorch computes it."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    return {
        "relu": lambda x, a: F.relu(x),
        "sigmoid": lambda x, a: torch.sigmoid(x),
        "tanh": lambda x, a: torch.tanh(x),
        "leaky_relu": lambda x, a: F.leaky_relu(x, a["alpha"]),
        "elu": lambda x, a: F.elu(x, a["alpha"]),
        "gelu": lambda x, a: F.gelu(x),
        "silu": lambda x, a: F.silu(x),
    }


def torch_forward(g, params: Mapping, x, loss: str | None = None, training: bool = False):
    """The network with torch.nn.functional; ``params`` values are torch tensors (may require grad).

    With ``loss`` given, returns the value of the loss's input (cross-entropy skips a final softmax).
    Batchnorm reads ``NAME.running_mean`` / ``NAME.running_var`` from ``params`` and, `training`, updates them.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    activations = _torch_activations()
    inp = g.graph["input"]
    vals = {inp: x.reshape(x.shape[0], *g.nodes[inp]["shape"])}
    stop = loss_input(g, loss) if loss else g.graph["output"]
    for n in execution_order(g):
        node = g.nodes[n]
        op, a, geo = node["op"], node["args"], node.get("geometry", {})
        ins = [vals[i] for i in node["inputs"]]
        if op == "input":
            continue
        if op == "conv":
            w = params[f"{n}.weight"]
            if a.get("connect") is not None:
                w = w * torch.as_tensor(connect_mask(a["connect"], tuple(w.shape)), dtype=w.dtype)[:, :, None, None]
            pt, pb, pl, pr = geo["pads"]
            xi = F.pad(ins[0], (pl, pr, pt, pb))
            y = F.conv2d(xi, w, params.get(f"{n}.bias"), stride=a["stride"], groups=a["groups"],
                         dilation=a["dilation"])
        elif op == "dense":
            y = F.linear(ins[0], params[f"{n}.weight"], params.get(f"{n}.bias"))
        elif op == "maxpool":
            pt, pb, pl, pr = geo["pads"]
            y = F.max_pool2d(F.pad(ins[0], (pl, pr, pt, pb), value=float("-inf")), geo["k"], geo["stride"])
        elif op == "avgpool":
            pt, pb, pl, pr = geo["pads"]
            y = F.avg_pool2d(F.pad(ins[0], (pl, pr, pt, pb)), geo["k"], geo["stride"])
        elif op == "global_avgpool":
            y = F.adaptive_avg_pool2d(ins[0], 1).flatten(1)
        elif op == "flatten":
            y = torch.flatten(ins[0], 1)
        elif op in activations:
            y = activations[op](ins[0], a)
        elif op == "softmax":
            y = F.softmax(ins[0], dim=1)
        elif op == "dropout":
            y = ins[0]
        elif op == "add":
            y = ins[0]
            for other in ins[1:]:
                y = y + other
        elif op == "concat":
            y = torch.cat(ins, dim=1)
        elif op == "batchnorm":
            y = F.batch_norm(ins[0], params[f"{n}.running_mean"], params[f"{n}.running_var"], params[f"{n}.weight"],
                             params[f"{n}.bias"], training=training, momentum=a["momentum"], eps=a["eps"])
        else:
            raise NotImplementedError(op)
        vals[n] = y
        if n == stop:
            return y
    raise AssertionError("output not reached")
