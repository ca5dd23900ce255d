"""Whole networks, compiled to native code, against the float64 numpy reference (tests/reference.py).

Tolerance: the native code computes in float32, so outputs are compared with
``rtol = 1e-5`` and ``atol = 1e-5 * max|reference|`` (absolute error relative
to the output's scale). The same tolerance is used against torch.nn.functional
(float64) when torch is importable, and between the host target and the
generic x86-64 target (different vector widths change the summation order).
Fused and unfused code (``fuse=False``) must agree to float32 rounding.

Each network is compiled once per process (``tests.reference.build`` memoises
the object code, never touching the on-disk cache).
"""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.ir import execution_order
from cnnc.reference import reference_forward
from tests.reference import (
    FILTERS,
    LAPLACIAN,
    MLP,
    MLP_NO_DROPOUT,
    NETWORKS,
    RESNET,
    SOBEL_X,
    build,
    graph,
    random_params,
)

RTOL = 1e-5
ATOL_SCALE = 1e-5


def batch(model, n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *model.input_shape)).astype(np.float32)


def assert_matches(got: np.ndarray, want: np.ndarray, rtol: float = RTOL, atol_scale: float = ATOL_SCALE) -> None:
    assert got.shape == want.shape
    atol = atol_scale * max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def write_params(model, params: dict) -> None:
    for k, v in params.items():
        model.params[k][...] = v


# ---- every network against the reference ---------------------------------------------------


@pytest.mark.parametrize("name", NETWORKS)
def test_initial_weights_match_reference(name: str) -> None:
    model = build(NETWORKS[name])
    x = batch(model)
    y = model(x)
    assert y.dtype == np.float32 and y.shape == (3, *model.output_shape)
    assert_matches(y, reference_forward(graph(NETWORKS[name]), model.params, model.prepare(x)))  # (normalize)


@pytest.mark.parametrize("name", NETWORKS)
def test_random_weights_match_reference(name: str) -> None:
    model = build(NETWORKS[name])
    g = graph(NETWORKS[name])
    write_params(model, random_params(g, np.random.default_rng(7)))
    x = batch(model, n=5, seed=2)
    assert_matches(model(x), reference_forward(g, model.params, model.prepare(x)))


def test_softmax_outputs_are_distributions() -> None:
    for name, axis in (("vgg", 1), ("branches", 1)):
        model = build(NETWORKS[name])
        y = model(batch(model)).astype(np.float64)
        assert (y >= 0).all()
        np.testing.assert_allclose(y.sum(axis=axis), 1.0, rtol=1e-5)


def test_dropout_is_identity_at_inference() -> None:
    with_dropout, without = build(MLP), build(MLP_NO_DROPOUT, seed=3)
    write_params(without, with_dropout.params)
    x = batch(with_dropout, n=4)
    np.testing.assert_array_equal(with_dropout(x), without(x))
    np.testing.assert_array_equal(with_dropout(x), with_dropout(x))  # deterministic


def test_written_weights_are_in_params_and_frozen() -> None:
    model = build(FILTERS)
    np.testing.assert_array_equal(model.params["edges.weight"], np.array(eval(LAPLACIAN), np.float32)[None, None])
    np.testing.assert_array_equal(model.params["grad.weight"], np.array(eval(SOBEL_X), np.float32)[None, None])
    assert "edges.bias" not in model.params
    frozen = {p["name"]: not p["trainable"] for p in model.manifest["params"]}
    assert frozen == {"edges.weight": True, "grad.weight": True, "out.1.weight": False, "out.1.bias": False,
                      "out.2.weight": False, "out.2.bias": False}
    g = graph(FILTERS)
    assert [g.nodes[n]["op"] for n in execution_order(g) if "fixed" in g.nodes[n]] == ["conv", "conv"]


# ---- the lecture's three worked convolutions ------------------------------------------------

# A 6x6 image (the one of a well-known vertical-edge example) and three convolutions worked by hand.
IMAGE = np.array([
    [3, 0, 1, 2, 7, 4],
    [1, 5, 8, 9, 3, 1],
    [2, 7, 2, 5, 1, 3],
    [0, 1, 3, 1, 7, 8],
    [4, 2, 1, 6, 2, 8],
    [2, 4, 5, 2, 3, 9],
], dtype=np.float32)

# Laplacian, valid: out[i][j] = up + left + right + down - 4 * centre, centre = IMAGE[i+1][j+1].
# e.g. out[0][0] = 0 + 1 + 8 + 7 - 4*5 = -4;  out[3][3] = 7 + 6 + 8 + 3 - 4*2 = 16.
# Note: a well-known lecture slide prints 3 at row 3, column 4 of its valid result where the
# arithmetic gives 2; the values below are the arithmetic, never the slide.
LAPLACIAN_VALID = [
    [-4, -15, -18, 6],
    [-18, 15, -7, 14],
    [8, -7, 17, -16],
    [2, 12, -18, 16],
]
# Laplacian with one row/column of zeros around the image: 6x6, the valid result in the middle.
# e.g. out[0][0] = 0 + 0 + 0 + 1 - 4*3 + ... = 0 (up) + 0 (left) + 0 (right: IMAGE[0][1]) + 1 (down) - 12 = -11.
LAPLACIAN_PADDED = [
    [-11, 9, 6, 9, -19, -8],
    [6, -4, -15, -18, 6, 6],
    [0, -18, 15, -7, 14, -2],
    [7, 8, -7, 17, -16, -14],
    [-12, 2, 12, -18, 16, -13],
    [0, -7, -13, 6, 1, -25],
]
# The 2x2 kernel [[1, 2], [3, 4]] with stride 2 (not flipped: cross-correlation, as in every CNN library):
# out[0][0] = 3*1 + 0*2 + 1*3 + 5*4 = 26;  out[2][2] = 2*1 + 8*2 + 3*3 + 9*4 = 63.
STRIDED = [
    [26, 65, 28],
    [20, 25, 60],
    [30, 36, 63],
]
LECTURE = {
    "valid": (f"conv(1, 3x3, bias=false, weights={LAPLACIAN})", LAPLACIAN_VALID),
    "padded": (f"conv(weights={LAPLACIAN}, pad=1, bias=false)", LAPLACIAN_PADDED),
    "strided": ("conv(1, 2x2, stride=2, bias=false, weights=[[1, 2], [3, 4]])", STRIDED),
}


@pytest.mark.parametrize("case", LECTURE)
def test_lecture_convolution(case: str) -> None:
    layer, expected = LECTURE[case]
    model = build(f"network lecture {{\n input image: 1x6x6\n out = image -> {layer}\n}}\n")
    y = model(IMAGE[None, None])
    np.testing.assert_array_equal(y[0, 0], np.array(expected, dtype=np.float32))


def test_lecture_padded_contains_valid() -> None:
    np.testing.assert_array_equal(np.array(LAPLACIAN_PADDED)[1:5, 1:5], np.array(LAPLACIAN_VALID))


# ---- fusion and targets -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "filters"])
def test_fused_equals_unfused(name: str) -> None:
    fused, unfused = build(NETWORKS[name]), build(NETWORKS[name], fuse=False)
    assert fused.manifest["params"] == unfused.manifest["params"]
    for k in fused.params:
        np.testing.assert_array_equal(fused.params[k], unfused.params[k])
    x = batch(fused, n=4)
    np.testing.assert_allclose(fused(x), unfused(x), rtol=1e-6, atol=1e-6 * float(np.abs(fused(x)).max()))


@pytest.mark.parametrize("name", ["mlp", "filters"])
def test_generic_target_equals_host(name: str) -> None:
    host, generic = build(NETWORKS[name]), build(NETWORKS[name], generic=True)
    assert "+avx512f" not in generic.manifest["target"]["features"].split(",")
    assert generic.manifest["target"]["cpu"] == "x86-64"
    x = batch(host, n=4)
    assert_matches(generic(x), host(x))
    assert_matches(generic(x), reference_forward(graph(NETWORKS[name]), generic.params, x))


def test_large_batch_spans_chunks() -> None:
    model = build(RESNET)
    x = batch(model, n=300, seed=5)
    y = model(x)
    assert_matches(y, reference_forward(graph(RESNET), model.params, x))
    np.testing.assert_array_equal(y[257:260], model(x[257:260]))


# ---- torch.nn.functional as a second oracle --------------------------------------------------


@pytest.mark.parametrize("name", NETWORKS)
def test_matches_torch(name: str) -> None:
    torch = pytest.importorskip("torch")
    from tests.reference import torch_forward

    model = build(NETWORKS[name])
    g = graph(NETWORKS[name])
    write_params(model, random_params(g, np.random.default_rng(11)))
    x = batch(model, n=3, seed=4)
    params = {k: torch.from_numpy(v.astype(np.float64)) for k, v in model.params.items()}
    with torch.no_grad():
        want = torch_forward(g, params, torch.from_numpy(model.prepare(x).astype(np.float64))).numpy()
    assert_matches(model(x), want.reshape(3, *model.output_shape))


# ---- networks without a layer between the input and the output -----------------------------------


@pytest.mark.parametrize("layer", ["flatten", "softmax"])
def test_output_computed_from_the_input_alone(layer: str) -> None:
    text = f"network view {{\n    input x: 2x3x3\n    o = x -> {layer}\n}}\n"
    model = build(text)
    x = np.random.default_rng(0).standard_normal((2, 2, 3, 3)).astype(np.float32)
    assert_matches(model(x), reference_forward(graph(text), model.params, x))
