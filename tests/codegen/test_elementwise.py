"""Activations, softmax, dropout and copy kernels against numpy references, on the host, AVX2 and generic x86-64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cnnc.codegen.elementwise import (
    emit_activation_backward,
    emit_activation_forward,
    emit_copy,
    emit_dropout_backward,
    emit_dropout_forward,
    emit_fan_out,
    emit_softmax_backward,
    emit_softmax_forward,
    emit_sum,
)
from cnnc.codegen.specs import CopySpec, DropoutSpec, ElementwiseSpec, FanOutSpec, SoftmaxSpec, SumSpec
from tests.codegen.buffers import (
    ACTS,
    N0,
    N1,
    N,
    act_args_of,
    act_grad_ref,
    act_ref,
    arena,
    assert_untouched,
    garbage,
    grad_reads_input,
    numeric_grad,
    slots,
    written,
)

RTOL, ATOL = 1e-5, 1e-6


# --- references ---------------------------------------------------------------------------------

def softmax_ref(x: np.ndarray, c: int, hw: int) -> np.ndarray:
    z = x.astype(np.float64).reshape(-1, c, hw)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).reshape(x.shape)


def softmax_grad_ref(y: np.ndarray, dy: np.ndarray, c: int, hw: int) -> np.ndarray:
    y3, dy3 = y.astype(np.float64).reshape(-1, c, hw), dy.astype(np.float64).reshape(-1, c, hw)
    return (y3 * (dy3 - (dy3 * y3).sum(axis=1, keepdims=True))).reshape(y.shape)


M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64_ref(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_mask_ref(seed: int, size: int, p: float, image0: int = 0) -> np.ndarray:
    """u = top 24 bits of splitmix64 at counter (image0 + n)*size + i, keyed by mix64(seed)."""
    key = mix64_ref(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    counter = np.arange(image0 * size, (image0 + N) * size, dtype=np.uint64).reshape(N, size)
    u = (mix64_ref(counter * np.uint64(0x9E3779B97F4A7C15) + key) >> np.uint64(40)).astype(np.float64) / 2.0**24
    return np.where(u >= p, np.float32(1.0 / (1.0 - p)), np.float32(0.0)).astype(np.float32)


# --- the references' gradients are right (float64 finite differences) ---------------------------


@pytest.mark.parametrize("act", ACTS)
def test_activation_grad_reference_matches_finite_differences(act):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 3.0, 12) * rng.choice([-1.0, 1.0], 12)  # away from the kink at 0
    dy = rng.standard_normal(12)
    np.testing.assert_allclose(act_grad_ref(x, act_ref(x, act), dy, act),
                               numeric_grad(lambda v: (act_ref(v, act) * dy).sum(), x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("c,hw", [(4, 1), (3, 5)])
def test_softmax_grad_reference_matches_finite_differences(c, hw):
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal(c * hw), rng.standard_normal(c * hw)
    np.testing.assert_allclose(softmax_grad_ref(softmax_ref(x, c, hw), dy, c, hw),
                               numeric_grad(lambda v: (softmax_ref(v, c, hw) * dy).sum(), x), rtol=1e-6, atol=1e-8)


# --- activations --------------------------------------------------------------------------------

# (size, x_stride, y_stride): odd sizes, sizes below and above every vector width, strided slots
ACT_SHAPES = [(1, 1, 3), (7, 9, 7), (37, 40, 37), (64, 64, 70), (100, 0, 0)]


@pytest.mark.parametrize("size,x_stride,y_stride", ACT_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_activations(jit, size, x_stride, y_stride, accumulate):
    for act in ACTS:
        spec = ElementwiseSpec(size=size, act=act, act_args=act_args_of(act), x_stride=x_stride, y_stride=y_stride,
                               accumulate=accumulate)
        emit_activation_forward(jit.module, f"fwd_{act}", spec, jit.vw)
        # the backward kernel reads the saved output, or the saved input (at its own stride)
        grad_spec = dataclasses.replace(spec, v_stride=x_stride if grad_reads_input(act) else 0)
        emit_activation_backward(jit.module, f"bwd_{act}", grad_spec, jit.vw)
    xs, ys = x_stride or size, y_stride or size
    rng = np.random.default_rng(size)
    for act in ACTS:
        x = arena(rng, xs, size, scale=4.0)
        y, x_before = garbage(ys), x.copy()
        jit(f"fwd_{act}", x, y, N0, N1)
        assert_untouched(x, x_before, np.zeros(x.shape, bool))
        assert_untouched(y, garbage(ys), written(y, ys, size))
        want = act_ref(slots(x, xs, size)[N0:N1], act)
        np.testing.assert_allclose(slots(y, ys, size)[N0:N1], want, rtol=RTOL, atol=ATOL, err_msg=act)

        dy = arena(rng, ys, size)
        dx = arena(rng, xs, size) if accumulate else garbage(xs)
        dx_before = dx.copy()
        jit(f"bwd_{act}", x if grad_reads_input(act) else y, dy, dx, N0, N1)
        assert_untouched(dx, dx_before, written(dx, xs, size))
        want = act_grad_ref(slots(x, xs, size)[N0:N1], slots(y, ys, size)[N0:N1], slots(dy, ys, size)[N0:N1], act)
        if accumulate:
            want = want + slots(dx_before, xs, size)[N0:N1]
        np.testing.assert_allclose(slots(dx, xs, size)[N0:N1], want, rtol=RTOL, atol=ATOL, err_msg=act)


@pytest.mark.parametrize("size", [5, 67])
def test_activations_in_place(jit, size):
    for act in ACTS:
        spec = ElementwiseSpec(size=size, act=act, act_args=act_args_of(act), x_stride=size + 2, y_stride=size + 2)
        emit_activation_forward(jit.module, f"fwd_{act}", spec, jit.vw)
        emit_activation_backward(jit.module, f"bwd_{act}", spec, jit.vw)
    rng = np.random.default_rng(7)
    for act in ACTS:
        buf = arena(rng, size + 2, size, scale=4.0)
        x_buf = buf.copy()
        x = slots(buf, size + 2, size).copy()
        jit(f"fwd_{act}", buf, buf, N0, N1)
        y = slots(buf, size + 2, size)[N0:N1].copy()
        np.testing.assert_allclose(y, act_ref(x[N0:N1], act), rtol=RTOL, atol=ATOL, err_msg=act)
        np.testing.assert_array_equal(slots(buf, size + 2, size)[[0, N - 1]], x[[0, N - 1]])

        dbuf = arena(rng, size + 2, size)
        dy = slots(dbuf, size + 2, size)[N0:N1].copy()
        jit(f"bwd_{act}", x_buf if grad_reads_input(act) else buf, dbuf, dbuf, N0, N1)
        np.testing.assert_allclose(slots(dbuf, size + 2, size)[N0:N1], act_grad_ref(x[N0:N1], y, dy, act),
                                   rtol=RTOL, atol=ATOL, err_msg=act)


@pytest.mark.parametrize("size", [7, 67])  # a scalar tail, and vectors of every width
def test_activations_propagate_nan_as_pytorch(jit, size):
    """relu(NaN) = NaN (maxnum would give 0 and hide it from the loss); every activation keeps NaN."""
    for act in ACTS:
        spec = ElementwiseSpec(size=size, act=act, act_args=act_args_of(act), x_stride=size, y_stride=size)
        emit_activation_forward(jit.module, f"fwd_{act}", spec, jit.vw)
        emit_activation_backward(jit.module, f"bwd_{act}", spec, jit.vw)
    rng = np.random.default_rng(size)
    for act in ACTS:
        x = arena(rng, size, size, scale=4.0)
        images = slots(x, size, size)
        images[rng.random(images.shape) < 0.2] = np.nan
        images[N0, :3] = [np.nan, -np.inf, np.inf]
        y = garbage(size)
        jit(f"fwd_{act}", x, y, N0, N1)
        with np.errstate(invalid="ignore", over="ignore"):
            want = act_ref(images[N0:N1], act)
        assert np.isnan(want).any()
        np.testing.assert_allclose(slots(y, size, size)[N0:N1], want, rtol=RTOL, atol=ATOL, err_msg=act)
        dy, dx = arena(rng, size, size), garbage(size)
        jit(f"bwd_{act}", x if grad_reads_input(act) else y, dy, dx, N0, N1)
        with np.errstate(invalid="ignore", over="ignore"):
            want = act_grad_ref(images[N0:N1], slots(y, size, size)[N0:N1], slots(dy, size, size)[N0:N1], act)
        finite_or_nan = ~np.isinf(images[N0:N1])  # (the gradient at +-inf is inf * 0 in the smooth references)
        np.testing.assert_allclose(slots(dx, size, size)[N0:N1][finite_or_nan], want[finite_or_nan],
                                   rtol=RTOL, atol=ATOL, err_msg=act)


# --- softmax ------------------------------------------------------------------------------------

# (c, hw, x_stride, y_stride): vector inputs (hw=1) of odd and large c, spatial maps with hw
# below, at and above the vector width, padded slots
SOFTMAX_SHAPES = [(1, 1, 0, 0), (10, 1, 13, 10), (37, 1, 37, 40), (100, 1, 0, 0),
                  (3, 17, 60, 51), (16, 5, 0, 0), (5, 67, 340, 335), (2, 4, 9, 8)]


@pytest.mark.parametrize("c,hw,x_stride,y_stride", SOFTMAX_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_softmax(jit, c, hw, x_stride, y_stride, accumulate):
    size = c * hw
    spec = SoftmaxSpec(c=c, hw=hw, x_stride=x_stride, y_stride=y_stride, accumulate=accumulate)
    emit_softmax_forward(jit.module, "fwd", spec, jit.vw)
    emit_softmax_backward(jit.module, "bwd", spec, jit.vw)
    xs, ys = x_stride or size, y_stride or size
    rng = np.random.default_rng(c * 100 + hw)
    x = arena(rng, xs, size, scale=20.0)
    slots(x, xs, size)[N0] += 1000.0  # exp overflows unless the maximum is subtracted
    y = garbage(ys)
    jit("fwd", x, y, N0, N1)
    assert_untouched(y, garbage(ys), written(y, ys, size))
    want = softmax_ref(slots(x, xs, size)[N0:N1], c, hw)
    np.testing.assert_allclose(slots(y, ys, size)[N0:N1], want, rtol=RTOL, atol=ATOL)

    dy = arena(rng, ys, size)
    dx = arena(rng, xs, size) if accumulate else garbage(xs)
    dx_before = dx.copy()
    jit("bwd", y, dy, dx, N0, N1)
    assert_untouched(dx, dx_before, written(dx, xs, size))
    want = softmax_grad_ref(slots(y, ys, size)[N0:N1], slots(dy, ys, size)[N0:N1], c, hw)
    if accumulate:
        want = want + slots(dx_before, xs, size)[N0:N1]
    np.testing.assert_allclose(slots(dx, xs, size)[N0:N1], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("c,hw", [(10, 1), (37, 1), (3, 17)])
def test_softmax_of_a_nan_is_nan_across_its_channels(jit, c, hw):
    """As in PyTorch: a NaN logit makes every probability of its position NaN, not a uniform 1 / c."""
    size = c * hw
    emit_softmax_forward(jit.module, "fwd", SoftmaxSpec(c=c, hw=hw), jit.vw)
    rng = np.random.default_rng(c)
    x = arena(rng, size, size, scale=5.0)
    slots(x, size, size)[N0, (c // 2) * hw] = np.nan  # channel c // 2 at the first position
    y = garbage(size)
    jit("fwd", x, y, N0, N1)
    want = softmax_ref(slots(x, size, size)[N0:N1], c, hw)
    np.testing.assert_allclose(slots(y, size, size)[N0:N1], want, rtol=RTOL, atol=ATOL)
    assert np.isnan(slots(y, size, size)[N0].reshape(c, hw)[:, 0]).all()


def test_softmax_backward_in_place(jit):
    c, hw = 6, 11
    spec = SoftmaxSpec(c=c, hw=hw)
    emit_softmax_forward(jit.module, "fwd", spec, jit.vw)
    emit_softmax_backward(jit.module, "bwd", spec, jit.vw)
    rng = np.random.default_rng(3)
    x, y = arena(rng, c * hw, c * hw), garbage(c * hw)
    jit("fwd", x, y, 0, N)
    g = arena(rng, c * hw, c * hw)
    dy = slots(g, c * hw, c * hw).copy()
    jit("bwd", y, g, g, 0, N)
    want = softmax_grad_ref(slots(y, c * hw, c * hw), dy, c, hw)
    np.testing.assert_allclose(slots(g, c * hw, c * hw), want, rtol=RTOL, atol=ATOL)


# --- dropout ------------------------------------------------------------------------------------


def _dropout_kernels(jit, spec: DropoutSpec) -> None:
    emit_dropout_forward(jit.module, "fwd", spec, jit.vw)
    emit_dropout_backward(jit.module, "bwd", spec, jit.vw)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics_and_exact_mask(jit, p):
    size = 4001  # odd: vector steps and a scalar remainder
    _dropout_kernels(jit, DropoutSpec(size=size, p=p))
    rng = np.random.default_rng(11)
    x, y, mask = arena(rng, size, size), garbage(size), garbage(size)
    jit("fwd", x, y, mask, 1234, 0, 0, N)
    m = slots(mask, size, size)
    assert set(np.unique(m)) <= {np.float32(0.0), np.float32(1.0 / (1.0 - p))}
    kept = np.count_nonzero(m) / m.size
    assert abs(kept - (1 - p)) < 4 * np.sqrt(p * (1 - p) / m.size), kept
    np.testing.assert_array_equal(m, dropout_mask_ref(1234, size, p))
    np.testing.assert_array_equal(slots(y, size, size), slots(x, size, size) * m)


def test_dropout_seeds_and_batch_splits(jit):
    size, p, stride = 37, 0.5, 41
    _dropout_kernels(jit, DropoutSpec(size=size, p=p, x_stride=stride, y_stride=stride, mask_stride=stride))
    rng = np.random.default_rng(12)
    x = arena(rng, stride, size)

    def run(seed, ranges, image0=0):
        y, mask = garbage(stride), garbage(stride)
        for n0, n1 in ranges:
            jit("fwd", x, y, mask, seed, image0, n0, n1)
        return y, mask

    y_all, mask_all = run(7, [(0, N)])
    assert_untouched(mask_all, garbage(stride), written(mask_all, stride, size, n0=0, n1=N))
    for k in range(N + 1):  # [0, k) then [k, N): identical mask and output
        y_split, mask_split = run(7, [(0, k), (k, N)])
        np.testing.assert_array_equal(mask_split, mask_all)
        np.testing.assert_array_equal(y_split, y_all)
    _, mask_again = run(7, [(0, N)])
    np.testing.assert_array_equal(mask_again, mask_all)
    _, mask_other = run(8, [(0, N)])
    assert not np.array_equal(slots(mask_other, stride, size), slots(mask_all, stride, size))
    _, mask_negative = run(-3, [(0, N)])  # any i64 seed is fine
    np.testing.assert_array_equal(slots(mask_negative, stride, size), dropout_mask_ref(-3, size, p))
    # image n of a call at image0 = 70 is image 70 + n of the whole batch (a chunk, an MPI rank's share)
    _, mask_shifted = run(7, [(0, N)], image0=70)
    np.testing.assert_array_equal(slots(mask_shifted, stride, size), dropout_mask_ref(7, size, p, image0=70))


@pytest.mark.parametrize("accumulate", [False, True])
def test_dropout_backward(jit, accumulate):
    size, xs, ys, ms = 29, 31, 30, 33
    _dropout_kernels(jit, DropoutSpec(size=size, p=0.3, x_stride=xs, y_stride=ys, mask_stride=ms,
                                      accumulate=accumulate))
    rng = np.random.default_rng(13)
    x, y, mask = arena(rng, xs, size), garbage(ys), garbage(ms)
    jit("fwd", x, y, mask, 99, 0, N0, N1)
    assert_untouched(mask, garbage(ms), written(mask, ms, size))
    assert_untouched(y, garbage(ys), written(y, ys, size))
    dy = arena(rng, ys, size)
    dx = arena(rng, xs, size) if accumulate else garbage(xs)
    dx_before = dx.copy()
    jit("bwd", mask, dy, dx, N0, N1)
    assert_untouched(dx, dx_before, written(dx, xs, size))
    want = slots(dy, ys, size)[N0:N1] * slots(mask, ms, size)[N0:N1]
    if accumulate:
        want = want + slots(dx_before, xs, size)[N0:N1]
    np.testing.assert_allclose(slots(dx, xs, size)[N0:N1], want, rtol=RTOL, atol=ATOL)


# --- copy ---------------------------------------------------------------------------------------

# (count, src_stride, dst_stride, src_offset, dst_offset): add (same layout), concat into a channel
# offset, the concat gradient (slice out of a larger source), short and odd runs
COPY_SHAPES = [(1, 1, 1, 0, 0), (7, 7, 20, 0, 13), (64, 64, 64, 0, 0), (37, 100, 37, 50, 0), (45, 50, 97, 3, 49)]


@pytest.mark.parametrize("count,src_stride,dst_stride,src_offset,dst_offset", COPY_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_copy(jit, count, src_stride, dst_stride, src_offset, dst_offset, accumulate):
    spec = CopySpec(count=count, src_stride=src_stride, dst_stride=dst_stride, src_offset=src_offset,
                    dst_offset=dst_offset, accumulate=accumulate)
    emit_copy(jit.module, "copy", spec, jit.vw)
    rng = np.random.default_rng(count)
    src = arena(rng, src_stride, src_stride)
    dst = arena(rng, dst_stride, dst_stride)
    before = dst.copy()
    jit("copy", src, dst, N0, N1)
    assert_untouched(dst, before, written(dst, dst_stride, count, dst_offset))
    want = slots(src, src_stride, src_offset + count)[N0:N1, src_offset:]
    if accumulate:
        want = want + slots(before, dst_stride, dst_offset + count)[N0:N1, dst_offset:]
    np.testing.assert_array_equal(slots(dst, dst_stride, dst_offset + count)[N0:N1, dst_offset:], want)


# (count, three per-image strides): short and odd runs, whole vectors, each tensor with its own stride
SUM_SHAPES = [(1, 1, 3, 2), (37, 37, 40, 45), (64, 64, 64, 64), (130, 131, 150, 130)]


@pytest.mark.parametrize("count,a_stride,b_stride,y_stride", SUM_SHAPES)
def test_sum_adds_two_tensors(jit, count, a_stride, b_stride, y_stride):
    emit_sum(jit.module, "sum", SumSpec(count, a_stride, b_stride, y_stride), jit.vw)
    rng = np.random.default_rng(count)
    a, b, y = arena(rng, a_stride, count), arena(rng, b_stride, count), arena(rng, y_stride, count)
    before = y.copy()
    jit("sum", a, b, y, N0, N1)
    assert_untouched(y, before, written(y, y_stride, count))
    want = slots(a, a_stride, count)[N0:N1] + slots(b, b_stride, count)[N0:N1]
    np.testing.assert_array_equal(slots(y, y_stride, count)[N0:N1], want)


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_sum_with_a_fused_activation(jit, act):
    count, a_stride, b_stride, y_stride = SUM_SHAPES[3]
    emit_sum(jit.module, "sum", SumSpec(count, a_stride, b_stride, y_stride, act, act_args_of(act)), jit.vw)
    rng = np.random.default_rng(5)
    a, b, y = arena(rng, a_stride, count), arena(rng, b_stride, count), arena(rng, y_stride, count)
    before = y.copy()
    jit("sum", a, b, y, N0, N1)
    assert_untouched(y, before, written(y, y_stride, count))
    total = slots(a, a_stride, count)[N0:N1] + slots(b, b_stride, count)[N0:N1]
    np.testing.assert_allclose(slots(y, y_stride, count)[N0:N1], act_ref(total.astype(np.float64), act), rtol=1e-6)


@pytest.mark.parametrize("count,dy_stride,a_stride,b_stride", SUM_SHAPES)
@pytest.mark.parametrize("acc_a,acc_b", [(False, False), (False, True), (True, True)])
def test_fan_out_gives_dy_to_both_inputs(jit, count, dy_stride, a_stride, b_stride, acc_a, acc_b):
    emit_fan_out(jit.module, "fan", FanOutSpec(count, dy_stride, a_stride, b_stride, acc_a, acc_b), jit.vw)
    rng = np.random.default_rng(count + 1)
    dy, a, b = arena(rng, dy_stride, count), arena(rng, a_stride, count), arena(rng, b_stride, count)
    before_a, before_b = a.copy(), b.copy()
    jit("fan", dy, a, b, N0, N1)
    d = slots(dy, dy_stride, count)[N0:N1]
    for got, before, stride, acc in ((a, before_a, a_stride, acc_a), (b, before_b, b_stride, acc_b)):
        assert_untouched(got, before, written(got, stride, count))
        want = d + slots(before, stride, count)[N0:N1] if acc else d
        np.testing.assert_array_equal(slots(got, stride, count)[N0:N1], want)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_squashing_activations_over_their_whole_range(jit, act):
    """A dense sweep: relative error under 2e-6 everywhere, saturation beyond the fitted range, NaN kept."""
    size = 4001
    spec = ElementwiseSpec(size=size, act=act, x_stride=size, y_stride=size, accumulate=False)
    emit_activation_forward(jit.module, "fwd", spec, jit.vw)
    x = np.zeros((N, size), np.float32)
    x[N0:N1] = np.concatenate([np.linspace(-12, 12, size - 6), [0.0, 1e-30, -1e-30, 1e4, -1e4, np.nan]])
    y = np.zeros_like(x)
    jit("fwd", x, y, N0, N1)
    with np.errstate(over="ignore"):  # the reference's exp(1e4): 1 / (1 + inf) is the right 0
        got, want = y[N0:N1, :-1].astype(np.float64), act_ref(x[N0:N1, :-1], act)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-37)
    assert np.all(np.isnan(y[N0:N1, -1])), "NaN must propagate (the loss check relies on it)"
    if act == "tanh":
        assert np.all(np.abs(got) <= 1.0), "|tanh| above 1 would flip the sign of its gradient 1 - y^2"


@pytest.mark.parametrize("act", ["elu", "gelu", "silu"])
def test_smooth_activations_over_their_whole_range(jit, act):
    """A dense sweep against the float64 reference, far tails included; NaN propagates, forward and backward.

    Error bound: 2e-6 relative plus 2e-7 |x| absolute (gelu's 1 + erf(x / sqrt 2) cancels for x << 0,
    as in PyTorch's float32 gelu).
    """
    size = 4001
    spec = ElementwiseSpec(size=size, act=act, act_args=act_args_of(act), x_stride=size, y_stride=size)
    emit_activation_forward(jit.module, "fwd", spec, jit.vw)
    emit_activation_backward(jit.module, "bwd", spec, jit.vw)
    x = np.zeros((N, size), np.float32)
    x[N0:N1] = np.concatenate([np.linspace(-12, 12, size - 6), [0.0, 1e-30, -1e-30, 1e4, -1e4, np.nan]])
    y = np.zeros_like(x)
    jit("fwd", x, y, N0, N1)
    got, want = y[N0:N1, :-1].astype(np.float64), act_ref(x[N0:N1, :-1], act)
    bound = 2e-6 * np.abs(want) + 2e-7 * np.abs(x[N0:N1, :-1]) + 1e-37
    assert np.all(np.abs(got - want) <= bound), act
    if act == "gelu":
        assert np.all(got[x[N0:N1, :-1] < 0] <= 0), "gelu keeps the sign of x"
    assert np.all(np.isnan(y[N0:N1, -1])), "NaN must propagate (the loss check relies on it)"

    dy = np.ones_like(x)
    dx = np.zeros_like(x)
    jit("bwd", x if grad_reads_input(act) else y, dy, dx, N0, N1)
    got = dx[N0:N1, :-1].astype(np.float64)
    want = act_grad_ref(x[N0:N1, :-1], y[N0:N1, :-1], dy[N0:N1, :-1], act)
    assert np.all(np.abs(got - want) <= 2e-6 * np.abs(want) + 4e-7 * np.maximum(1.0, np.abs(x[N0:N1, :-1]))), act
    assert np.all(np.isnan(dx[N0:N1, -1])), "a NaN input gives a NaN gradient"
