"""Batchnorm kernels against float64 references, on the host, AVX2 and generic x86-64; the reduction between them
against the op table's reference gradient, and that against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.codegen.batchnorm import (
    emit_bn_apply,
    emit_bn_apply_add,
    emit_bn_backward,
    emit_bn_fold,
    emit_bn_grad_sums,
    emit_bn_grad_sums_fan_out,
    emit_bn_stats,
)
from cnnc.codegen.module import BN_COEFS
from cnnc.codegen.specs import BatchNormSpec, FoldSpec, ResidualSpec
from cnnc.ops.batchnorm import reference, reference_grad, scale_shift
from cnnc_runtime.batchnorm import Statistics
from tests.codegen.buffers import (
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

SHAPES = [(3, 37), (4, 64), (13, 1)]  # (channels, positions): odd planes, whole vectors, a feature vector
NODE = {"args": {"eps": 1e-5, "momentum": 0.1}}


def _stride(c: int, hw: int) -> int:
    return c * hw + 7  # room between images, filled with garbage the kernels must not read as data


def _images(buf: np.ndarray, c: int, hw: int, n0: int = N0, n1: int = N1) -> np.ndarray:
    return slots(buf, _stride(c, hw), c * hw)[n0:n1].reshape(n1 - n0, c, hw).astype(np.float64)


@pytest.mark.parametrize("c,hw", SHAPES)
def test_stats_are_the_shards_sum_and_squared_deviations(jit, c, hw):
    spec = BatchNormSpec(c=c, hw=hw, x_stride=_stride(c, hw))
    emit_bn_stats(jit.module, "stats", spec, jit.vw)
    rng = np.random.default_rng(1)
    x = arena(rng, spec.x_stride, c * hw, scale=3.0) + np.float32(100.0)  # an offset that naive sums would lose
    partial = np.full(2 * c + 3, -1.0)
    jit("stats", x, partial, N0, N0, N1)
    v = _images(x, c, hw)
    np.testing.assert_allclose(partial[:c], v.sum(axis=(0, 2)), rtol=1e-6)
    np.testing.assert_allclose(partial[c:2 * c], ((v - v.mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2)),
                               rtol=1e-4)
    assert (partial[2 * c:] == -1.0).all()
    in_parts = np.full_like(partial, -1.0)  # the shard in calls of one image (the step's chunks), in order
    for n in range(N0, N1):
        jit("stats", x, in_parts, N0, n, n + 1)
    np.testing.assert_array_equal(in_parts, partial)


@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_apply_is_a_per_channel_affine_map_then_the_activation(jit, c, hw, act):
    spec = BatchNormSpec(c=c, hw=hw, x_stride=_stride(c, hw), y_stride=_stride(c, hw), act=act,
                         act_args=act_args_of(act))
    emit_bn_apply(jit.module, "apply", spec, jit.vw)
    rng = np.random.default_rng(2)
    x = arena(rng, spec.x_stride, c * hw)
    scale, shift = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    y = garbage(spec.y_stride)
    before = y.copy()
    jit("apply", x, scale, shift, y, N0, N1)
    want = act_ref(_images(x, c, hw) * scale[:, None] + shift[:, None], act)
    np.testing.assert_allclose(_images(y, c, hw), want, rtol=1e-5, atol=1e-5)
    assert_untouched(y, before, written(y, spec.y_stride, c * hw))


@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
def test_grad_sums_are_sum_dy_and_sum_dy_times_centred_x(jit, c, hw, act):
    """After taking dy through a fused activation in place: from its output (relu) or input (gelu), which
    lives at a stride of its own."""
    saved_stride = _stride(c, hw) + 5
    spec = BatchNormSpec(c=c, hw=hw, x_stride=_stride(c, hw), y_stride=_stride(c, hw), act=act,
                         act_args=act_args_of(act), v_stride=saved_stride)
    emit_bn_grad_sums(jit.module, "sums", spec, jit.vw)
    rng = np.random.default_rng(3)
    x, dy = arena(rng, spec.x_stride, c * hw), arena(rng, spec.y_stride, c * hw)
    z = arena(rng, saved_stride, c * hw)  # the activation's input; saved: what its gradient reads
    saved = z if grad_reads_input(act) else act_ref(z, act).astype(np.float32)
    mean = rng.standard_normal(c).astype(np.float32)
    partial = np.full(2 * c, 5.0)
    before = dy.copy()
    jit("sums", x, dy, mean, partial, saved if act != "none" else None, N0, N0, N1)
    v, d = _images(x, c, hw), _images(before, c, hw)
    if act != "none":
        zs = slots(z, saved_stride, c * hw)[N0:N1].reshape(d.shape)
        d = act_grad_ref(zs, act_ref(zs, act), d, act)
        np.testing.assert_allclose(_images(dy, c, hw), d, rtol=1e-5, atol=1e-6)
    assert_untouched(dy, before, written(dy, spec.y_stride, c * hw))
    np.testing.assert_allclose(partial[:c], d.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(partial[c:], (d * (v - mean[:, None])).sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    in_parts, dy_again = np.full_like(partial, 5.0), before.copy()  # the shard in calls of one image, in order
    for n in range(N0, N1):
        jit("sums", x, dy_again, mean, in_parts, saved if act != "none" else None, N0, n, n + 1)
    np.testing.assert_array_equal(in_parts, partial)
    np.testing.assert_array_equal(dy_again, dy)


@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("act", ["none", "relu"])
def test_apply_add_is_the_affine_map_plus_the_residual_then_the_activation(jit, c, hw, act):
    """Each tensor at a stride of its own: the add's other input and the activation's output live elsewhere."""
    stride = _stride(c, hw)
    spec = ResidualSpec(c=c, hw=hw, x_stride=stride, r_stride=stride + 3, y_stride=stride + 6, act=act,
                        act_args=act_args_of(act))
    emit_bn_apply_add(jit.module, "apply_add", spec, jit.vw)
    rng = np.random.default_rng(8)
    x, r = arena(rng, spec.x_stride, c * hw), arena(rng, spec.r_stride, c * hw)
    scale, shift = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    y = garbage(spec.y_stride)
    before = y.copy()
    jit("apply_add", x, scale, shift, r, y, N0, N1)
    rs = slots(r, spec.r_stride, c * hw)[N0:N1].reshape(N1 - N0, c, hw)
    want = act_ref(_images(x, c, hw) * scale[:, None] + shift[:, None] + rs, act)
    got = slots(y, spec.y_stride, c * hw)[N0:N1].reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert_untouched(y, before, written(y, spec.y_stride, c * hw))


@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("act", ["none", "relu"])
@pytest.mark.parametrize("accumulate", [(False, False), (True, False), (False, True)])
def test_grad_sums_fan_out_sends_the_activations_gradient_to_both_inputs_and_sums_it(jit, c, hw, act, accumulate):
    """g = dy * act'(saved) into the add's two input gradients (each written or added to by its flag), and
    the batchnorm's sums of g and of g times centred x; dy and saved are left as they were."""
    stride = _stride(c, hw)
    strides = {"x": stride, "dy": stride + 2, "saved": stride + 4, "a": stride + 6, "b": stride + 8}
    spec = ResidualSpec(c=c, hw=hw, x_stride=strides["x"], y_stride=strides["dy"], v_stride=strides["saved"],
                        a_stride=strides["a"], b_stride=strides["b"], act=act, act_args=act_args_of(act),
                        accumulate_a=accumulate[0], accumulate_b=accumulate[1])
    emit_bn_grad_sums_fan_out(jit.module, "sums_fan_out", spec, jit.vw)
    rng = np.random.default_rng(9)
    t = {k: arena(rng, s, c * hw) for k, s in strides.items()}
    t["saved"] = np.maximum(t["saved"], 0) if act == "relu" else t["saved"]  # an activation's output
    mean = rng.standard_normal(c).astype(np.float32)
    partial = np.full(2 * c, 5.0)
    before = {k: v.copy() for k, v in t.items()}
    jit("sums_fan_out", t["x"], t["dy"], mean, partial, t["saved"] if act != "none" else None, t["a"], t["b"],
        N0, N0, N1)

    def images(k: str, buf: np.ndarray) -> np.ndarray:
        return slots(buf, strides[k], c * hw)[N0:N1].reshape(N1 - N0, c, hw).astype(np.float64)

    g = images("dy", before["dy"])
    if act != "none":
        saved = images("saved", before["saved"])  # relu's output: positive exactly where its input is
        g = act_grad_ref(saved, saved, g, act)
    for k, acc in zip("ab", accumulate):
        np.testing.assert_allclose(images(k, t[k]), g + (images(k, before[k]) if acc else 0), rtol=1e-5, atol=1e-6)
        assert_untouched(t[k], before[k], written(t[k], strides[k], c * hw))
    for k in ("x", "dy", "saved"):
        np.testing.assert_array_equal(t[k], before[k])
    np.testing.assert_allclose(partial[:c], g.sum(axis=(0, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(partial[c:], (g * (images("x", t["x"]) - mean[:, None])).sum(axis=(0, 2)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_backward_applies_the_three_coefficients(jit, c, hw, accumulate):
    spec = BatchNormSpec(c=c, hw=hw, x_stride=_stride(c, hw), y_stride=_stride(c, hw), dx_stride=_stride(c, hw),
                         accumulate=accumulate)
    emit_bn_backward(jit.module, "backward", spec, jit.vw)
    rng = np.random.default_rng(4)
    x, dy, dx = (arena(rng, spec.x_stride, c * hw) for _ in range(3))
    k, cx, cc = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    before = dx.copy()
    jit("backward", dy, x, k, cx, cc, dx, N0, N1)
    want = k[:, None] * _images(dy, c, hw) + cx[:, None] * _images(x, c, hw) + cc[:, None]
    if accumulate:
        want += _images(before, c, hw)
    np.testing.assert_allclose(_images(dx, c, hw), want, rtol=1e-5, atol=1e-5)
    assert_untouched(dx, before, written(dx, spec.dx_stride, c * hw))


@pytest.mark.parametrize("o,bias", [(6, True), (37, True), (5, False)])
def test_fold_gives_the_scale_and_the_shifted_bias(jit, o, bias):
    """(vector steps and the scalar rest of `o` channels)"""
    emit_bn_fold(jit.module, "fold", FoldSpec(o=o, eps=1e-3, bias=bias), jit.vw)
    rng = np.random.default_rng(5)
    b = rng.standard_normal(o).astype(np.float32)
    gamma, beta, mean = (rng.standard_normal(o).astype(np.float32) for _ in range(3))
    var = rng.random(o).astype(np.float32) + 0.1
    s_out, b_out = np.zeros(o, np.float32), np.zeros(o, np.float32)
    jit("fold", b if bias else None, gamma, beta, mean, var, s_out, b_out, 0, 1)
    scale, shift = scale_shift(gamma.astype(np.float64), beta, mean, var, 1e-3)
    np.testing.assert_allclose(s_out, scale, rtol=1e-5)
    np.testing.assert_allclose(b_out, shift + (b * scale if bias else 0), rtol=1e-5, atol=1e-6)


def _layer(c: int, hw: int) -> dict:
    return {"layer": "bn", "channels": c, "count": hw, "stats": 0, "eps": 1e-5, "momentum": 0.1,
            "coefs": {k: i * c for i, k in enumerate(BN_COEFS)}}


@pytest.mark.parametrize("c,hw", SHAPES)
def test_shards_reduced_in_order_give_the_whole_batchs_forward_and_gradient(jit, c, hw):
    """The kernels on three shards of a batch, with the runtime's reductions between them, equal the op
    table's float64 reference of the whole batch: output, weight and bias gradients, input gradient."""
    stride = _stride(c, hw)
    spec = BatchNormSpec(c=c, hw=hw, x_stride=stride, y_stride=stride, dx_stride=stride)
    for emitter, name in ((emit_bn_stats, "stats"), (emit_bn_apply, "apply"), (emit_bn_grad_sums, "sums"),
                          (emit_bn_backward, "backward")):
        emitter(jit.module, name, spec, jit.vw)
    rng = np.random.default_rng(6)
    x, dy = arena(rng, stride, c * hw, 2.0) + np.float32(1.5), arena(rng, stride, c * hw)
    y, dx = garbage(stride), garbage(stride)
    params = {f"bn.{k}": rng.standard_normal(c).astype(np.float32) for k in ("weight", "bias")}
    state = {"bn.running_mean": np.zeros(c, np.float32), "bn.running_var": np.ones(c, np.float32)}
    grads = {"bn.weight": np.zeros(c, np.float32), "bn.bias": np.zeros(c, np.float32)}
    manifest = {"layers": [_layer(c, hw)], "phases": {}, "stats_doubles": 2 * c, "bn_floats": 6 * c}
    st = Statistics(manifest, lambda n: np.zeros(n, np.float32))
    shards = [(0, 2), (2, 3), (3, N)]
    st.shard_buffers(len(shards))
    coef = {k: st.coef("bn", k) for k in BN_COEFS}
    for (a, b), p in zip(shards, st.partials):
        jit("stats", x, p, a, a, b)
    st.forward("bn", shards, params, state)
    for a, b in shards:
        jit("apply", x, coef["scale"], coef["shift"], y, a, b)
    for (a, b), p in zip(shards, st.partials):
        jit("sums", x, dy, coef["mean"], p, None, a, a, b)
    st.backward("bn", shards, params, grads)
    for a, b in shards:
        jit("backward", dy, x, coef["k"], coef["cx"], coef["cc"], dx, a, b)

    xs, dys = _images(x, c, hw, 0, N), _images(dy, c, hw, 0, N)
    layer = {"weight": params["bn.weight"].astype(np.float64), "bias": params["bn.bias"].astype(np.float64),
             "training": True}
    np.testing.assert_allclose(_images(y, c, hw, 0, N), reference(NODE, [xs], layer), rtol=1e-4, atol=1e-5)
    (want_dx,), want = reference_grad(NODE, [xs], None, dys, layer)
    np.testing.assert_allclose(_images(dx, c, hw, 0, N), want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["bn.weight"], want["weight"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["bn.bias"], want["bias"], rtol=1e-5, atol=1e-5)
    m = N * hw
    np.testing.assert_allclose(state["bn.running_mean"], 0.1 * xs.mean(axis=(0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["bn.running_var"], 0.9 + 0.1 * xs.var(axis=(0, 2)) * m / (m - 1), rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_the_reference_gradient_matches_central_differences(shape, training):
    rng = np.random.default_rng(7)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    c = shape[1]
    layer = {"weight": rng.standard_normal(c), "bias": rng.standard_normal(c), "training": training,
             "running_mean": rng.standard_normal(c), "running_var": rng.random(c) + 0.5}
    (dx,), grads = reference_grad(NODE, [x], None, dy, layer)
    loss = lambda v: float((reference(NODE, [v], layer) * dy).sum())
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    for kind in ("weight", "bias"):
        def loss_of(v, kind=kind):
            return float((reference(NODE, [x], {**layer, kind: v}) * dy).sum())
        np.testing.assert_allclose(grads[kind], numeric_grad(loss_of, layer[kind]), rtol=1e-5, atol=1e-7)
