"""Fuzzing the ``Model`` API with hypothesis: whatever it is given, it answers or raises ``ValueError``.

Inputs, labels and parameter values of random shapes, dtypes (NaN and inf,
bool, complex, object, strings, 0-d, views claiming 10^12 images) and sizes:
every call returns output of the right shape (finite when what it was given
was finite and moderate) or raises ``ValueError``; nothing else escapes and
nothing crashes.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference import build

NET = """
network fuzz {
    input x: 2x5x5
    a = x -> conv(3, 3x3) -> relu -> dropout(0.3)
    b = a -> flatten -> dense(4)
}
"""
INPUT = (2, 5, 5)
OUTPUTS = 4
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = [np.float32, np.float64, np.float16, np.int8, np.int64, np.uint8, np.uint64, np.bool_, np.complex64,
          np.object_, np.dtype("U3"), np.dtype([("a", "f4")]), np.dtype("M8[s]")]
SPECIALS = [np.nan, np.inf, -np.inf, 1e30, -0.0]


@pytest.fixture(scope="module")
def model():
    return build(NET)


@st.composite
def arrays(draw, tail: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """(an array, whether its values are finite and moderate): mostly of shape (N, *tail), sometimes not."""
    n = draw(st.integers(0, 6))
    shape = draw(st.one_of(st.just((n, *tail)), st.just(tail), st.just(()),
                           st.lists(st.integers(0, 6), max_size=5).map(tuple)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = np.array(rng.standard_normal(shape) * draw(st.sampled_from([1.0, 3.0, 200.0])))
    moderate = True
    if values.size and draw(st.booleans()):
        values.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from(SPECIALS))
        moderate = False
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    with np.errstate(all="ignore"):
        arr = np.zeros(shape, dtype) if dtype.kind in "VM" else values.astype(dtype)
    if arr.ndim and draw(st.booleans()):
        arr = arr[..., ::-1]  # not contiguous
    return arr, moderate and dtype.kind in "fiub"


def huge_view(tail: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """10^12 images that take no memory: one float broadcast."""
    return np.broadcast_to(np.float64(1.0), (10**12, *tail)), False


def inputs() -> st.SearchStrategy:
    return st.one_of(arrays(INPUT), st.builds(huge_view, st.just(INPUT)), st.just((np.array(3.0), False)),
                     st.just(([[1, 2], [3]], False)), st.just((None, False)), st.just(("images", False)))


def labels() -> st.SearchStrategy:
    return st.one_of(arrays(()).map(lambda a: (a[0].ravel(), a[1])), st.integers(-3, 6).map(lambda k: (k, True)),
                     st.lists(st.integers(-1, 5), max_size=7).map(lambda v: (v, True)), arrays((OUTPUTS,)))


@FUZZ
@given(x=inputs())
def test_forward_answers_or_refuses(model, x):
    x, moderate = x
    try:
        y = model(x)
    except ValueError:
        return
    assert y.shape == (np.shape(x)[0], OUTPUTS) and y.dtype == np.float32
    if moderate:
        assert np.isfinite(y).all()


@FUZZ
@given(x=inputs(), y=labels(), loss=st.sampled_from([None, "cross_entropy", "mse"]), seed=st.integers(0, 2**64))
def test_value_and_grad_answers_or_refuses(model, x, y, loss, seed):
    (x, x_moderate), (y, y_moderate) = x, y
    try:
        value, grads = model.value_and_grad(x, y, loss=loss, seed=seed)
    except ValueError:
        return
    assert isinstance(value, float)
    assert {k: g.shape for k, g in grads.items()} == {k: v.shape for k, v in model.params.items()}
    if x_moderate and y_moderate:
        assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads.values())


@FUZZ
@given(name=st.sampled_from(["a.weight", "a.bias", "b.weight", "b.bias"]), data=st.data())
def test_assigning_parameters_copies_or_refuses(model, name, data):
    shape = model.params[name].shape
    value, moderate = data.draw(st.one_of(arrays(shape[1:]),
                                          arrays(()), st.builds(huge_view, st.just(shape[1:]))))
    before = model.flat_params.copy()
    try:
        model.params[name] = value
    except ValueError:
        np.testing.assert_array_equal(model.flat_params, before)
        return
    with np.errstate(all="ignore"):
        expected = np.asarray(value).astype(np.float32)
    np.testing.assert_array_equal(model.params[name], expected)
    assert np.isfinite(model.params[name]).all()
    model.flat_params[...] = before
