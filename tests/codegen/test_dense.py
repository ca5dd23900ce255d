"""Dense kernels against numpy references (float64), on the host, AVX2 and generic x86-64.

Batch tensors live in per-image arena slots (stride >= size) with NaN (inputs)
or a sentinel (outputs) in the gaps and in images outside the batch range.
Tolerance: rtol=1e-5, atol=1e-5 * max(1, max|reference|).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cnnc.codegen.dense import (
    WEIGHTS_IN_CACHE,
    emit_dense_backward_data,
    emit_dense_backward_weights,
    emit_dense_forward,
)
from cnnc.codegen.specs import DenseSpec
from tests.codegen.buffers import ACTS, act_args_of, act_ref

SENTINEL = np.float32(-777.25)
N_IMAGES = 7


def make_spec(f: int, o: int, gap: int = 0, **options) -> DenseSpec:
    return DenseSpec(f=f, o=o, x_stride=f + gap, y_stride=o + gap, **options)


# (spec, n0, n1): batch ranges cover 3-image blocks plus a remainder, a single image and n0 > 0
CASES = {
    "1x1": (make_spec(1, 1, gap=2), 1, 7),
    "7_to_5": (make_spec(7, 5, gap=3, accumulate=True), 2, 6),
    "33_to_17": (make_spec(33, 17, gap=1), 1, 6),
    "100_to_10_nobias": (make_spec(100, 10, bias=False, accumulate=True), 0, 7),
    "16_to_16": (make_spec(16, 16, gap=16), 3, 4),
    "50_to_3": (make_spec(50, 3, gap=5), 1, 3),
    "3_to_50": (make_spec(3, 50, gap=4, accumulate=True), 1, 5),
    # weights past WEIGHTS_IN_CACHE: the forward reads them once per call (4 x 4 tiles, 5 images: a remainder)
    "wide_701_to_190": (make_spec(701, 190, gap=3), 1, 6),
}


def arena(rows: np.ndarray, stride: int, gap_value: float, n0: int, n1: int, outside: float) -> np.ndarray:
    """float32 (N, stride): row n at the start of slot n; gaps get `gap_value`, rows outside [n0, n1) `outside`."""
    buf = np.full((rows.shape[0], stride), gap_value, dtype=np.float32)
    buf[:, :rows.shape[1]] = rows
    buf[:n0, :rows.shape[1]] = outside
    buf[n1:, :rows.shape[1]] = outside
    return buf


def check(out: np.ndarray, before: np.ndarray, expected: np.ndarray, n0: int, n1: int) -> None:
    """Rows n0..n1, first expected.shape[1] floats, match; everything else is unchanged."""
    size = expected.shape[1]
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(out[n0:n1, :size], expected, rtol=1e-5, atol=1e-5 * scale)
    untouched = np.ones(out.shape, dtype=bool)
    untouched[n0:n1, :size] = False
    np.testing.assert_array_equal(out[untouched], before[untouched])


def exact32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize(("spec", "n0", "n1"), CASES.values(), ids=CASES.keys())
def test_dense_kernels(jit, spec: DenseSpec, n0: int, n1: int) -> None:
    rng = np.random.default_rng(5)
    s = spec
    emit_dense_forward(jit.module, "fwd", s, jit.vw)
    emit_dense_backward_data(jit.module, "bwd_data", s, jit.vw)
    emit_dense_backward_weights(jit.module, "bwd_weights", s, jit.vw)

    x_buf = arena(rng.uniform(-1, 1, (N_IMAGES, s.f)), s.x_stride, np.nan, n0, n1, np.nan)
    dy_buf = arena(rng.uniform(-1, 1, (N_IMAGES, s.o)), s.y_stride, np.nan, n0, n1, np.nan)
    x = x_buf[n0:n1, :s.f].astype(np.float64)
    dy = dy_buf[n0:n1, :s.o].astype(np.float64)
    w = exact32(rng.uniform(-1, 1, (s.o, s.f)))
    bias = exact32(rng.uniform(-1, 1, s.o)) if s.bias else None
    w32 = w.astype(np.float32)
    b32 = None if bias is None else bias.astype(np.float32)

    # forward; an empty range first writes nothing
    y = np.full((N_IMAGES, s.y_stride), SENTINEL, dtype=np.float32)
    jit("fwd", x_buf, w32, b32, y, 4, 4)
    assert np.all(y == SENTINEL)
    jit("fwd", x_buf, w32, b32, y, n0, n1)
    check(y, np.full_like(y, SENTINEL), x @ w.T + (0.0 if bias is None else bias), n0, n1)

    # backward data
    dx0 = arena(rng.uniform(-1, 1, (N_IMAGES, s.f)), s.x_stride, SENTINEL, n0, n1, SENTINEL)
    dx = dx0.copy()
    jit("bwd_data", dy_buf, w32, dx, n0, n1)
    expected = dy @ w + (dx0[n0:n1, :s.f] if s.accumulate else 0.0)
    check(dx, dx0, expected, n0, n1)

    # backward weights: accumulate into random initial gradients
    dw0 = rng.uniform(-1, 1, (s.o, s.f)).astype(np.float32)
    db0 = rng.uniform(-1, 1, s.o).astype(np.float32) if s.bias else None
    dw = dw0.copy()
    db = None if db0 is None else db0.copy()
    jit("bwd_weights", x_buf, dy_buf, dw, db, n0, n1)
    dw_ref = dy.T @ x
    np.testing.assert_allclose(dw, dw0 + dw_ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(dw_ref).max()))
    if db is not None:
        db_ref = dy.sum(axis=0)
        np.testing.assert_allclose(db, db0 + db_ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(db_ref).max()))


def test_wide_weights_take_the_other_loop_order() -> None:
    spec = CASES["wide_701_to_190"][0]
    assert spec.o * spec.f > WEIGHTS_IN_CACHE >= max(s.o * s.f for s, _, _ in CASES.values() if s is not spec)


def test_dense_forward_activations(jit) -> None:
    """Every activation, on outputs that are not a multiple of any vector width."""
    rng = np.random.default_rng(9)
    base = make_spec(19, 13, gap=3)
    specs = {act: dataclasses.replace(base, act=act, act_args=act_args_of(act)) for act in ACTS}
    for act, s in specs.items():
        emit_dense_forward(jit.module, f"fwd_{act}", s, jit.vw)
    n0, n1 = 1, 6
    x_buf = arena(rng.uniform(-2, 2, (N_IMAGES, base.f)), base.x_stride, np.nan, n0, n1, np.nan)
    w = exact32(rng.uniform(-1, 1, (base.o, base.f)))
    bias = exact32(rng.uniform(-1, 1, base.o))
    pre = x_buf[n0:n1, :base.f].astype(np.float64) @ w.T + bias
    for act in specs:
        y = np.full((N_IMAGES, base.y_stride), SENTINEL, dtype=np.float32)
        jit(f"fwd_{act}", x_buf, w.astype(np.float32), bias.astype(np.float32), y, n0, n1)
        check(y, np.full_like(y, SENTINEL), act_ref(pre, act), n0, n1)


def test_reference_gradients_finite_difference() -> None:
    """The formulas the kernel tests use are the gradients of L = sum((x W^T + b) * g), in float64."""
    rng = np.random.default_rng(1)
    x, w, b, g = rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), rng.normal(size=5), rng.normal(size=(3, 5))
    loss = lambda: float(np.sum((x @ w.T + b) * g))

    def numeric(v: np.ndarray) -> np.ndarray:
        grad = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            old = v[i]
            v[i] = old + 1e-6
            up = loss()
            v[i] = old - 1e-6
            down = loss()
            v[i] = old
            grad[i] = (up - down) / 2e-6
        return grad

    np.testing.assert_allclose(g @ w, numeric(x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g.T @ x, numeric(w), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g.sum(axis=0), numeric(b), rtol=1e-6, atol=1e-8)
