"""Cross-entropy and MSE loss kernels against numpy references, on the host, AVX2 and generic x86-64."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.codegen.loss import emit_loss
from cnnc.codegen.specs import LossSpec
from tests.codegen.buffers import GARBAGE, N0, N1, N, arena, assert_untouched, garbage, numeric_grad, slots, written

RTOL, ATOL = 1e-5, 1e-6


# --- references (float64) -----------------------------------------------------------------------


def cross_entropy_ref(x: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image loss -sum(q log softmax(x)) and its gradient softmax(x) - q, q = (1 - e) onehot(label) + e / k."""
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    q = np.full(x.shape, smoothing / x.shape[1])
    q[np.arange(len(x)), labels] += 1.0 - smoothing
    return -(q * logp).sum(axis=1), np.exp(logp) - q


def mse_ref(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = x.astype(np.float64) - t.astype(np.float64)
    return (d * d).sum(axis=1), 2.0 * d


def test_loss_grad_references_match_finite_differences():
    rng = np.random.default_rng(0)
    x, t, labels = rng.standard_normal((3, 6)), rng.standard_normal((3, 6)), np.array([0, 5, 2])
    for e in (0.0, 0.2):
        np.testing.assert_allclose(cross_entropy_ref(x, labels, e)[1],
                                   numeric_grad(lambda v, e=e: cross_entropy_ref(v, labels, e)[0].sum(), x),
                                   rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(mse_ref(x, t)[1], numeric_grad(lambda v: mse_ref(v, t)[0].sum(), x),
                               rtol=1e-6, atol=1e-8)


# --- kernels ------------------------------------------------------------------------------------

# (k, x_stride, dx_stride): single output, odd k around the vector widths, padded slots (0 = packed)
SHAPES = [(1, 0, 0), (3, 5, 3), (10, 10, 13), (17, 20, 0), (37, 0, 41), (100, 103, 100)]


def _run(jit, kind: str, k: int, x_stride: int, dx_stride: int, seed: int, smoothing: float = 0.0):
    emit_loss(jit.module, "loss", LossSpec(kind, k, x_stride=x_stride, dx_stride=dx_stride), jit.vw)
    xs, dxs = x_stride or k, dx_stride or k
    rng = np.random.default_rng(seed)
    x = arena(rng, xs, k, scale=10.0)
    if kind == "cross_entropy":
        slots(x, xs, k)[N0] += 500.0  # exp overflows unless the maximum is subtracted
        target = rng.integers(0, k, N).astype(np.int32)
        target[N0], target[N1 - 1] = 0, k - 1
        scale = 1.0 / N
    else:
        target = rng.standard_normal((N, k)).astype(np.float32)
        scale = 1.0 / (N * k)
    dx, loss = garbage(dxs), np.full(N + 2, GARBAGE, np.float32)
    x_before = x.copy()
    jit("loss", x, target, dx, loss, scale, smoothing, N0, N1)
    assert_untouched(x, x_before, np.zeros(x.shape, bool))
    assert_untouched(dx, garbage(dxs), written(dx, dxs, k))
    assert_untouched(loss, np.full(loss.size, GARBAGE, np.float32), np.isin(np.arange(loss.size), np.arange(N0, N1)))
    xv = slots(x, xs, k)[N0:N1]
    want_loss, want_grad = cross_entropy_ref(xv, target[N0:N1], smoothing) if kind == "cross_entropy" else \
        mse_ref(xv, target[N0:N1])
    np.testing.assert_allclose(loss[N0:N1], want_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(slots(dx, dxs, k)[N0:N1], scale * want_grad, rtol=RTOL, atol=ATOL * scale)


@pytest.mark.parametrize("k,x_stride,dx_stride", SHAPES)
def test_cross_entropy(jit, k, x_stride, dx_stride):
    _run(jit, "cross_entropy", k, x_stride, dx_stride, seed=k)


@pytest.mark.parametrize("k,x_stride,dx_stride", SHAPES)
def test_cross_entropy_with_label_smoothing(jit, k, x_stride, dx_stride):
    _run(jit, "cross_entropy", k, x_stride, dx_stride, seed=k + 2, smoothing=0.1)


def test_label_smoothing_matches_torch(jit):
    """Against torch.nn.functional.cross_entropy(label_smoothing=0.15): loss and gradient, rel. 1e-5."""
    torch = pytest.importorskip("torch")
    k, n = 10, 6
    emit_loss(jit.module, "loss", LossSpec("cross_entropy", k), jit.vw)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
    labels = rng.integers(0, k, n).astype(np.int32)
    dx, loss = np.zeros_like(x), np.zeros(n, np.float32)
    jit("loss", x, labels, dx, loss, 1.0 / n, 0.15, 0, n)
    t = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.cross_entropy(t, torch.tensor(labels, dtype=torch.long), label_smoothing=0.15)
    want.backward()
    assert loss.mean() == pytest.approx(want.item(), rel=1e-5)
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k,x_stride,dx_stride", SHAPES)
def test_mse(jit, k, x_stride, dx_stride):
    _run(jit, "mse", k, x_stride, dx_stride, seed=k + 1)


def test_cross_entropy_gradient_in_place_of_logits(jit):
    k = 21
    emit_loss(jit.module, "loss", LossSpec("cross_entropy", k), jit.vw)
    rng = np.random.default_rng(3)
    x = arena(rng, k, k, scale=3.0)
    logits = slots(x, k, k).copy()
    labels = rng.integers(0, k, N).astype(np.int32)
    loss = np.full(N, GARBAGE, np.float32)
    jit("loss", x, labels, x, loss, 0.5, 0.0, 0, N)
    want_loss, want_grad = cross_entropy_ref(logits, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(slots(x, k, k), 0.5 * want_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("k,lowest_gap", [(2, -30.0), (64, -5.0)])
def test_log_is_accurate_over_the_range_logsumexp_needs(jit, k, lowest_gap):
    """The libm-free log used for logsumexp: the sum of exps lies in [1, k].

    Logits are (0, gap, ..., gap) with label 0, so loss = log(1 + (k-1) e**gap). Gaps stay where
    the float32 sum of exps is accurate to an ulp or so (with k=64 and gaps below -5, each tiny
    term would round away against the 1 and that summation error, not log, would dominate).
    """
    n = 4000
    emit_loss(jit.module, "loss", LossSpec("cross_entropy", k), jit.vw)
    gaps = np.concatenate([np.linspace(lowest_gap, 0.0, n // 2),
                           -np.geomspace(1e-7, -lowest_gap, n // 2)]).astype(np.float32)
    x = np.repeat(gaps[:, None], k, axis=1)
    x[:, 0] = 0.0
    labels, dx, loss = np.zeros(n, np.int32), np.zeros_like(x), np.zeros(n, np.float32)
    jit("loss", x, labels, dx, loss, 1.0, 0.0, 0, n)
    want = np.log1p((k - 1) * np.exp(gaps.astype(np.float64)))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
