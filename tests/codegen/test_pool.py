"""Max and average pooling kernels against numpy references, on the host, AVX2 and generic x86-64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cnnc.codegen.pool import emit_pool_backward, emit_pool_forward, takes_activation_grad
from cnnc.codegen.specs import PoolSpec
from cnnc.ops import ACTIVATIONS
from tests.codegen.buffers import (
    ACT_ARGS,
    N0,
    N1,
    N,
    act_args_of,
    arena,
    assert_untouched,
    garbage,
    numeric_grad,
    slots,
    written,
)

RTOL, ATOL = 1e-5, 1e-6


# --- references (float64, PyTorch semantics: max pads -inf, avg counts padded zeros) ------------


def padded(x: np.ndarray, s: PoolSpec, value: float) -> np.ndarray:
    """x (B, c, h, w) padded top/left by pt/pl and bottom/right as far as the last window reaches."""
    pb = max(0, (s.oh - 1) * s.sh + s.kh - s.pt - s.h)
    pr = max(0, (s.ow - 1) * s.sw + s.kw - s.pl - s.w)
    return np.pad(x.astype(np.float64), ((0, 0), (0, 0), (s.pt, pb), (s.pl, pr)), constant_values=value)


def windows(s: PoolSpec):
    for oy in range(s.oh):
        for ox in range(s.ow):
            yield oy, ox, np.s_[:, :, oy * s.sh: oy * s.sh + s.kh, ox * s.sw: ox * s.sw + s.kw]


def pool_ref(x: np.ndarray, s: PoolSpec) -> np.ndarray:
    xp = padded(x, s, -np.inf if s.kind == "max" else 0.0)
    y = np.empty(x.shape[:2] + (s.oh, s.ow))
    for oy, ox, win in windows(s):
        y[:, :, oy, ox] = xp[win].max(axis=(2, 3)) if s.kind == "max" else xp[win].sum(axis=(2, 3)) / (s.kh * s.kw)
    return y


def pool_grad_ref(x: np.ndarray, dy: np.ndarray, s: PoolSpec) -> np.ndarray:
    """avg: dy / (kh*kw) to every tap; max: dy to the window's first maximum in row-major order.

    Padding never receives the max gradient, even when every real tap is -inf (as in PyTorch):
    padding is NaN here, which never equals the maximum.
    """
    xp = padded(x, s, np.nan)
    dxp = np.zeros_like(xp)
    bi, ci = np.indices(x.shape[:2])
    for oy, ox, win in windows(s):
        g = dy[:, :, oy, ox].astype(np.float64)
        if s.kind == "avg":
            dxp[win] += g[:, :, None, None] / (s.kh * s.kw)  # NaN padding is cropped below
        else:
            taps = xp[win].reshape(x.shape[:2] + (-1,))
            first = np.argmax(taps == np.nanmax(taps, axis=-1, keepdims=True), axis=-1)  # first True
            ky, kx = np.divmod(first, s.kw)
            np.add.at(dxp, (bi, ci, oy * s.sh + ky, ox * s.sw + kx), g)
    return dxp[:, :, s.pt: s.pt + s.h, s.pl: s.pl + s.w]


def spec_of(kind, c, h, w, kh, kw, sh, sw, pt=0, pl=0, oh=None, ow=None, **kw_) -> PoolSpec:
    """Output size from symmetric padding unless given (a larger oh/ow implies bottom/right padding)."""
    oh = oh or (h + 2 * pt - kh) // sh + 1
    ow = ow or (w + 2 * pl - kw) // sw + 1
    return PoolSpec(kind, c, h, w, oh, ow, kh, kw, sh, sw, pt, pl, **kw_)


CASES = {
    "max2x2s2": ("max", 3, 8, 8, 2, 2, 2, 2),
    "avg2x2s2_tiles_exactly": ("avg", 6, 14, 10, 2, 2, 2, 2),  # LeNet's subsampling: gradient spread, no adds
    "avg3x2s3x2_tiles_exactly": ("avg", 2, 9, 8, 3, 2, 3, 2),
    # wide rows: vectors of outputs, then every narrower piece (23 = 16 + 4 + 2 + 1 columns)
    "max2x2s2_tiles_exactly_wide": ("max", 3, 6, 46, 2, 2, 2, 2),
    "avg3x2s3x2_tiles_exactly_wide": ("avg", 2, 9, 62, 3, 2, 3, 2),
    "max3x2s3x2_tiles_exactly_wide": ("max", 2, 9, 62, 3, 2, 3, 2),
    "max1x2s1x2_tiles_exactly_wide": ("max", 2, 5, 70, 1, 2, 1, 2),
    "max3x3s2p1_overlap_odd": ("max", 2, 7, 9, 3, 3, 2, 2, 1, 1),
    "avg3x3s2p1_overlap_odd": ("avg", 2, 7, 9, 3, 3, 2, 2, 1, 1),
    "max2x3_asym_pad": ("max", 3, 5, 8, 2, 3, 1, 2, 1, 1),
    "avg2x3_asym_pad": ("avg", 3, 5, 8, 2, 3, 1, 2, 1, 1),
    "avg3x3s1_same": ("avg", 2, 6, 6, 3, 3, 1, 1, 1, 1),
    "max2x2s1_same_bottom_right_pad": ("max", 2, 5, 5, 2, 2, 1, 1, 0, 0, 5, 5),
    "avg2x2s1_same_bottom_right_pad": ("avg", 2, 5, 5, 2, 2, 1, 1, 0, 0, 5, 5),
    "max3x3s3_uncovered_edge": ("max", 1, 10, 11, 3, 3, 3, 3),
    "avg_global_7x7": ("avg", 5, 7, 7, 7, 7, 1, 1),
    "avg_global_30x30": ("avg", 2, 30, 30, 30, 30, 1, 1),
    "avg_global_1x1": ("avg", 17, 1, 1, 1, 1, 1, 1),
    "max_global_6x5": ("max", 4, 6, 5, 6, 5, 1, 1),
}
# per-image slack (floats of garbage after each image) for x and y; 0 = packed (spec stride 0)
SLACK = {"max2x2s2": (0, 0), "avg_global_1x1": (3, 0), "max3x3s2p1_overlap_odd": (5, 0)}


def make_spec(case: str, accumulate: bool = False) -> tuple[PoolSpec, int, int]:
    probe = spec_of(*CASES[case])
    xsize, ysize = probe.c * probe.h * probe.w, probe.c * probe.oh * probe.ow
    x_slack, y_slack = SLACK.get(case, (7, 3))
    x_stride = xsize + x_slack if x_slack else 0
    y_stride = ysize + y_slack if y_slack else 0
    spec = spec_of(*CASES[case], x_stride=x_stride, y_stride=y_stride, accumulate=accumulate)
    return spec, x_stride or xsize, y_stride or ysize


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("accumulate", [False, True])
def test_pool(jit, case, accumulate):
    spec, xs, ys = make_spec(case, accumulate)
    emit_pool_forward(jit.module, "fwd", spec, jit.vw)
    emit_pool_backward(jit.module, "bwd", spec, jit.vw)
    xsize, ysize = spec.c * spec.h * spec.w, spec.c * spec.oh * spec.ow
    rng = np.random.default_rng(len(case))
    x, y = arena(rng, xs, xsize), garbage(ys)
    x_before = x.copy()
    jit("fwd", x, y, N0, N1)
    assert_untouched(y, garbage(ys), written(y, ys, ysize))
    x4 = slots(x, xs, xsize)[N0:N1].reshape(-1, spec.c, spec.h, spec.w)
    want = pool_ref(x4, spec).reshape(N1 - N0, -1)
    np.testing.assert_allclose(slots(y, ys, ysize)[N0:N1], want, rtol=RTOL, atol=ATOL)

    dy = arena(rng, ys, ysize)
    dx = arena(rng, xs, xsize) if accumulate else garbage(xs)
    dx_before = dx.copy()
    jit("bwd", x, y, dy, dx, N0, N1)
    assert_untouched(x, x_before, np.zeros(x.shape, bool))
    assert_untouched(dx, dx_before, written(dx, xs, xsize))
    dy4 = slots(dy, ys, ysize)[N0:N1].reshape(-1, spec.c, spec.oh, spec.ow)
    want = pool_grad_ref(x4, dy4, spec).reshape(N1 - N0, -1)
    if accumulate:
        want = want + slots(dx_before, xs, xsize)[N0:N1]
    np.testing.assert_allclose(slots(dx, xs, xsize)[N0:N1], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", ["max3x3s2p1_overlap_odd", "max2x3_asym_pad", "max2x2s1_same_bottom_right_pad",
                                  "max_global_6x5", "max2x2s2", "max2x2s2_tiles_exactly_wide",
                                  "max3x2s3x2_tiles_exactly_wide", "max1x2s1x2_tiles_exactly_wide"])
def test_max_pool_ties_go_to_first_maximum(jit, case):
    spec, xs, ys = make_spec(case)
    emit_pool_forward(jit.module, "fwd", spec, jit.vw)
    emit_pool_backward(jit.module, "bwd", spec, jit.vw)
    xsize, ysize = spec.c * spec.h * spec.w, spec.c * spec.oh * spec.ow
    rng = np.random.default_rng(5)
    x = garbage(xs)
    slots(x, xs, xsize)[:] = rng.integers(0, 3, (N, xsize))  # many ties
    slots(x, xs, xsize)[N0, : spec.w] = -np.inf  # a row of -inf next to the padding
    y, dx = garbage(ys), garbage(xs)
    dy = garbage(ys)
    slots(dy, ys, ysize)[:] = rng.integers(1, 100, (N, ysize))  # integers: sums are exact
    jit("fwd", x, y, N0, N1)
    jit("bwd", x, y, dy, dx, N0, N1)
    x4 = slots(x, xs, xsize)[N0:N1].reshape(-1, spec.c, spec.h, spec.w)
    dy4 = slots(dy, ys, ysize)[N0:N1].reshape(-1, spec.c, spec.oh, spec.ow)
    np.testing.assert_array_equal(slots(y, ys, ysize)[N0:N1], pool_ref(x4, spec).reshape(N1 - N0, -1))
    np.testing.assert_array_equal(slots(dx, xs, xsize)[N0:N1], pool_grad_ref(x4, dy4, spec).reshape(N1 - N0, -1))


def pool_grad_ref_nan(x: np.ndarray, dy: np.ndarray, s: PoolSpec) -> np.ndarray:
    """Max pooling's gradient as PyTorch routes it: to the window's last NaN if it has one, else to its first
    maximum; padding never receives anything (a window of -inf sends dy to its first real tap)."""
    dx = np.zeros(x.shape)
    for b, ch in np.ndindex(*x.shape[:2]):
        for oy in range(s.oh):
            for ox in range(s.ow):
                taps = [(iy, ix) for iy in range(oy * s.sh - s.pt, oy * s.sh - s.pt + s.kh)
                        for ix in range(ox * s.sw - s.pl, ox * s.sw - s.pl + s.kw) if 0 <= iy < s.h and 0 <= ix < s.w]
                values = np.array([x[b, ch, iy, ix] for iy, ix in taps])
                nans = np.flatnonzero(np.isnan(values))
                k = nans[-1] if len(nans) else int(np.argmax(values == values.max()))
                dx[b, ch][taps[k]] += dy[b, ch, oy, ox]
    return dx


@pytest.mark.parametrize("case", ["max2x2s2", "max2x2s2_tiles_exactly_wide", "max3x2s3x2_tiles_exactly_wide",
                                  "max1x2s1x2_tiles_exactly_wide", "max3x3s2p1_overlap_odd", "max2x3_asym_pad",
                                  "max_global_6x5"])
def test_max_pool_propagates_nan_as_pytorch(jit, case):
    """A NaN in a window makes its maximum NaN (maxnum would drop it) and takes the gradient (the last NaN)."""
    spec, xs, ys = make_spec(case)
    emit_pool_forward(jit.module, "fwd", spec, jit.vw)
    emit_pool_backward(jit.module, "bwd", spec, jit.vw)
    xsize, ysize = spec.c * spec.h * spec.w, spec.c * spec.oh * spec.ow
    rng = np.random.default_rng(11)
    x = arena(rng, xs, xsize)
    images = slots(x, xs, xsize)
    images[rng.random(images.shape) < 0.3 / (spec.kh * spec.kw)] = np.nan  # about a third of the windows
    images[N0, :4] = [np.nan, np.nan, 5.0, -np.inf]  # two NaNs in one window, the first image's first window
    y, dx = garbage(ys), garbage(xs)
    dy = garbage(ys)
    slots(dy, ys, ysize)[:] = rng.integers(1, 100, (N, ysize))  # integers: sums are exact
    jit("fwd", x, y, N0, N1)
    jit("bwd", x, y, dy, dx, N0, N1)
    x4 = images[N0:N1].reshape(-1, spec.c, spec.h, spec.w)
    dy4 = slots(dy, ys, ysize)[N0:N1].reshape(-1, spec.c, spec.oh, spec.ow)
    want = pool_ref(x4, spec).reshape(N1 - N0, -1)
    assert np.isnan(want).any() and not np.isnan(want).all()
    np.testing.assert_array_equal(slots(y, ys, ysize)[N0:N1], want)
    np.testing.assert_array_equal(slots(dx, xs, xsize)[N0:N1], pool_grad_ref_nan(x4, dy4, spec).reshape(N1 - N0, -1))


def test_max_pool_nan_reference_agrees_with_the_tie_reference_without_nan():
    s = spec_of(*CASES["max3x3s2p1_overlap_odd"])
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, s.c, s.h, s.w)).astype(np.float64)  # ties
    dy = rng.integers(1, 100, (2, s.c, s.oh, s.ow)).astype(np.float64)
    np.testing.assert_array_equal(pool_grad_ref_nan(x, dy, s), pool_grad_ref(x, dy, s))


def test_max_pool_tie_routing_example():
    """The reference itself: a 2x2 window of equal values sends everything to its top-left tap."""
    s = spec_of("max", 1, 2, 3, 2, 2, 1, 1)
    x = np.array([[[[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]]])
    dx = pool_grad_ref(x, np.array([[[[10.0, 20.0]]]]), s)
    np.testing.assert_array_equal(dx, [[[[10.0, 20.0, 0.0], [0.0, 0.0, 0.0]]]])


@pytest.mark.parametrize("case", ["max3x3s2p1_overlap_odd", "avg3x3s2p1_overlap_odd", "avg2x3_asym_pad",
                                  "avg2x2s1_same_bottom_right_pad", "avg_global_7x7", "max_global_6x5"])
def test_pool_grad_reference_matches_finite_differences(case):
    s = spec_of(*CASES[case])
    rng = np.random.default_rng(2)
    x = rng.permutation(s.c * s.h * s.w).reshape(1, s.c, s.h, s.w) * 0.01  # distinct values: max is smooth
    dy = rng.standard_normal((1, s.c, s.oh, s.ow))
    np.testing.assert_allclose(pool_grad_ref(x, dy, s), numeric_grad(lambda v: (pool_ref(v, s) * dy).sum(), x),
                               rtol=1e-6, atol=1e-8)


def test_pool_rejects_windows_in_padding():
    with pytest.raises(ValueError):
        emit_pool_forward(None, "bad", PoolSpec("max", 1, 4, 4, 3, 3, 2, 2, 1, 1, pt=2, pl=0), 4)


FUSED_ACTS = [name for name, a in ACTIVATIONS.items() if a.grad_from == "output"]


@pytest.mark.parametrize("case", ["avg2x2s2_tiles_exactly", "max2x2s2_tiles_exactly_wide", "avg3x2s3x2_tiles_exactly"])
@pytest.mark.parametrize("act", FUSED_ACTS)
def test_pool_backward_applies_the_gradient_of_the_activation_before_it(jit, case, act):
    """dx = the pool's gradient times act'(z), read from the pool's input x = act(z): what the separate
    activation gradient would give, in the pass that stores dx."""
    spec, xs, ys = make_spec(case)
    spec = dataclasses.replace(spec, act=act, act_args=act_args_of(act))
    assert takes_activation_grad(spec)
    emit_pool_backward(jit.module, "bwd", spec, jit.vw)
    xsize, ysize = spec.c * spec.h * spec.w, spec.c * spec.oh * spec.ow
    rng = np.random.default_rng(5)
    z = rng.uniform(-2, 2, (N1 - N0, xsize))
    a = ACT_ARGS.get(act, {})
    x = garbage(xs)
    slots(x, xs, xsize)[N0:N1] = ACTIVATIONS[act].reference(z, a)
    dy, dx = arena(rng, ys, ysize), garbage(xs)
    jit("bwd", x, None, dy, dx, N0, N1)
    assert_untouched(dx, garbage(xs), written(dx, xs, xsize))
    y64 = slots(x, xs, xsize)[N0:N1].astype(np.float64)  # act(z) as float32 holds it: what the kernel reads
    x4 = y64.reshape(-1, spec.c, spec.h, spec.w)
    dy4 = slots(dy, ys, ysize)[N0:N1].reshape(-1, spec.c, spec.oh, spec.ow)
    want = pool_grad_ref(x4, dy4, spec).reshape(N1 - N0, -1) * ACTIVATIONS[act].derivative(z, y64, a)
    np.testing.assert_allclose(slots(dx, xs, xsize)[N0:N1], want, rtol=1e-4, atol=1e-5)


def test_pool_backward_takes_an_activation_only_where_it_stores_each_dx_once(jit):
    spec, _, _ = make_spec("max3x3s2p1_overlap_odd")
    assert not takes_activation_grad(spec)
    with pytest.raises(ValueError, match="once"):
        emit_pool_backward(jit.module, "bwd", dataclasses.replace(spec, act="tanh"), jit.vw)
    assert not takes_activation_grad(make_spec("avg2x2s2_tiles_exactly", accumulate=True)[0])
