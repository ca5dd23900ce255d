"""Kernel-test helpers: batch buffers with garbage between images (to catch writes out of bounds), and
finite differences.

Kernels run on images [N0, N1); images 0 and N-1 lie outside and must stay untouched, as must the
floats between images (a slot's stride is larger than the image) and the tail after the last slot.
"""

from __future__ import annotations

import numpy as np

from cnnc.ops import ACTIVATIONS
from cnnc.ops.activations import act_args

N, N0, N1 = 5, 1, 4
GARBAGE = np.float32(-7777.0)


def slots(buf: np.ndarray, stride: int, size: int) -> np.ndarray:
    """The (N, size) image view of a flat arena of N slots of `stride` floats."""
    return buf[: N * stride].reshape(N, stride)[:, :size]


def arena(rng: np.random.Generator, stride: int, size: int, scale: float = 1.0) -> np.ndarray:
    """N slots of `stride` floats (plus a tail): random images, garbage in between."""
    buf = np.full(N * stride + 5, GARBAGE, np.float32)
    slots(buf, stride, size)[:] = rng.standard_normal((N, size)) * scale
    return buf


def garbage(stride: int) -> np.ndarray:
    """N slots of `stride` floats (plus a tail), all garbage."""
    return np.full(N * stride + 5, GARBAGE, np.float32)


def written(buf: np.ndarray, stride: int, size: int, offset: int = 0, n0: int = N0, n1: int = N1) -> np.ndarray:
    """Mask of the floats a kernel may write: images [n0, n1), `size` floats from `offset`."""
    mask = np.zeros(buf.shape, bool)
    slots(mask, stride, offset + size)[n0:n1, offset:] = True
    return mask


def assert_untouched(after: np.ndarray, before: np.ndarray, mask: np.ndarray) -> None:
    """Bit-for-bit equality outside `mask` (NaN-safe)."""
    assert np.array_equal(after.view(np.uint32)[~mask], before.view(np.uint32)[~mask]), "wrote outside its images"


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of scalar f at float64 x (checks the numpy references themselves)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


# Arguments the kernel tests give the activations that take any: not the defaults, so that a kernel
# ignoring its arguments fails.
ACT_ARGS = {"leaky_relu": {"alpha": 0.1}, "elu": {"alpha": 0.7}}
ACTS = ["none", *ACTIVATIONS]


def act_args_of(act: str) -> tuple:
    """What a kernel spec carries for `act` (``act_args`` field)."""
    return act_args(ACT_ARGS.get(act, {}))


def act_ref(x: np.ndarray, act: str) -> np.ndarray:
    """The op table's float64 reference of `act` (``"none"``: the identity)."""
    x = np.asarray(x, dtype=np.float64)
    return x if act == "none" else ACTIVATIONS[act].reference(x, ACT_ARGS.get(act, {}))


def act_grad_ref(x: np.ndarray, y: np.ndarray, dy: np.ndarray, act: str) -> np.ndarray:
    """dL/dx = dL/dy * f'(x), in float64, from the op table's derivative."""
    x, y, dy = (np.asarray(v, dtype=np.float64) for v in (x, y, dy))
    return dy if act == "none" else dy * ACTIVATIONS[act].derivative(x, y, ACT_ARGS.get(act, {}))


def grad_reads_input(act: str) -> bool:
    """Whether `act`'s backward kernel reads the saved input instead of the output."""
    return act != "none" and ACTIVATIONS[act].grad_from == "input"
