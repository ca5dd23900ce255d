"""Writing weights into a model: ``params[name] = array``, ``load`` of bad files, frozen weights, sizes, threads."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnnc_runtime import memory, parallel
from cnnc_runtime.model import Model
from tests.clitools import cnnc_cmd, one_line_error
from tests.reference import FILTERS, NETWORKS, build

TINY = """
network tiny {
    input x: 2x5x5
    a = x -> conv(3, 3x3) -> relu
    b = a -> flatten -> dense(4)
}
"""


@pytest.fixture
def tiny():
    return build(TINY)


# ---- params[name] = array ---------------------------------------------------------------------------


def test_assigning_a_parameter_changes_the_model_and_what_it_saves(tiny, tmp_path):
    x = np.ones((2, 2, 5, 5), np.float32)
    before = tiny(x)
    tiny.params["b.bias"] = np.arange(4)  # integers are converted to float32
    np.testing.assert_allclose(tiny(x) - before, np.broadcast_to(np.arange(4), (2, 4)), atol=1e-5)
    assert tiny.params["b.bias"].dtype == np.float32
    tiny.params["b.bias"][0] = 7.0  # still the model's writable view
    tiny.save(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as saved:
        np.testing.assert_array_equal(saved["b.bias"], [7, 1, 2, 3])


def test_params_reads_like_a_dict(tiny):
    assert list(tiny.params) == list(tiny.params.keys()) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert len(tiny.params) == 4 and "a.bias" in tiny.params
    assert dict(tiny.params.items())["a.weight"].shape == (3, 2, 3, 3)
    assert {**tiny.params}.keys() == tiny.params.keys()


@pytest.mark.parametrize("value, message", [
    (np.zeros((3, 2, 3)), r"a\.weight has shape \(3, 2, 3\), the network needs \(3, 2, 3, 3\)"),
    (np.zeros((3, 2, 3, 3), complex), "dtype complex128; parameters take real or integer values"),
    (np.zeros((3, 2, 3, 3), bool), "dtype bool"),
    (np.full((3, 2, 3, 3), "x"), "dtype <U1"),
    (np.full((3, 2, 3, 3), np.nan), "not finite"),
    (np.full((3, 2, 3, 3), 1e39), "not finite"),
    ([[1, 2], [3]], "not an array of numbers"),
])
def test_a_bad_assignment_is_refused_and_changes_nothing(tiny, value, message):
    before = tiny.state()
    with pytest.raises(ValueError, match=message):
        tiny.params["a.weight"] = value
    for k, v in before.items():
        np.testing.assert_array_equal(tiny.params[k], v)


def test_names_cannot_be_added_or_removed(tiny):
    with pytest.raises(ValueError, match="no parameter 'c.weight'"):
        tiny.params["c.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="cannot be removed"):
        del tiny.params["a.weight"]
    assert len(tiny.params) == 4


def test_weights_fixed_in_the_source_cannot_be_assigned_other_values():
    model = build(FILTERS)
    fixed = model.params["edges.weight"].copy()
    model.params["edges.weight"] = fixed  # the same values: fine
    with pytest.raises(ValueError, match=r"edges\.weight differs from the weights fixed for it"):
        model.params["edges.weight"] = fixed + 1


# ---- load ----------------------------------------------------------------------------------------


def _npz(tmp_path, arrays: dict, name: str = "w.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_load_refuses_an_npy_file(tiny, tmp_path):
    np.save(tmp_path / "w.npy", tiny.params["a.weight"])
    with pytest.raises(ValueError, match=r"w\.npy: not a weights file written by save\(\) \(\.npz\): it holds one"):
        tiny.load(tmp_path / "w.npy")


@pytest.mark.parametrize("bad", [
    np.zeros(4, complex), np.zeros(4, [("a", "f4")]), np.array([1, np.inf, 0, 0]), np.array([np.nan, 0, 0, 0]),
    np.full(4, 1e300), np.zeros(4, object),
])
def test_load_refuses_values_that_are_not_finite_reals_and_changes_nothing(tiny, tmp_path, bad):
    before = tiny.state()
    arrays = {k: v + 1.0 for k, v in before.items()} | {"b.bias": bad}
    with pytest.raises(ValueError, match=r"w\.npz"):
        tiny.load(_npz(tmp_path, arrays))
    for k, v in before.items():
        np.testing.assert_array_equal(tiny.params[k], v)


def test_load_refuses_values_for_frozen_weights_that_differ(tmp_path):
    model = build(FILTERS)
    model.save(tmp_path / "same.npz")
    model.load(tmp_path / "same.npz")
    arrays = model.state()
    arrays["grad.weight"] = arrays["grad.weight"] * 2
    with pytest.raises(ValueError, match=r"grad\.weight differs from the weights fixed for it"):
        model.load(_npz(tmp_path, arrays))


# ---- sizes and thread counts ----------------------------------------------------------------------


def test_a_network_too_large_for_memory_is_refused_before_allocating(monkeypatch):
    small = build(TINY)
    monkeypatch.setattr(memory, "physical_memory", lambda: 1000)  # bytes: less than TINY's buffers
    with pytest.raises(ValueError, match=r"network tiny needs .* GiB, more than this machine's"):
        Model(small.manifest, small._obj)


@pytest.mark.parametrize("value", ["abc", "2.5", "0", "-1", "5000", "1" * 5000], ids=lambda v: v[:8])
def test_bad_cnnc_threads_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("CNNC_THREADS", value)
    with pytest.raises(ValueError, match=r"^CNNC_THREADS must be a whole number of threads from 1 to \d+"):
        parallel.default_threads()
    with pytest.raises(ValueError, match="CNNC_THREADS"):
        build(TINY)


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "2", 10**6])
def test_bad_thread_counts_are_refused(tiny, value):
    with pytest.raises(ValueError, match=r"^threads must be a whole number of threads from 1 to \d+"):
        Model(tiny.manifest, tiny._obj, threads=value)


def test_cnnc_threads_within_range_is_used(monkeypatch):
    monkeypatch.setenv("CNNC_THREADS", f" {parallel.max_threads()} ")
    assert parallel.default_threads() == parallel.max_threads()
    monkeypatch.setenv("CNNC_THREADS", "")
    assert parallel.default_threads() == len(os.sched_getaffinity(0))


def test_the_modern_network_still_loads_what_it_saves(tmp_path):
    model = build(NETWORKS["lenet_modern"], seed=3)
    model.save(tmp_path / "w.npz")
    other = build(NETWORKS["lenet_modern"])
    other.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(other.flat_params, model.flat_params)


def test_the_command_line_reports_a_bad_cnnc_threads_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "tiny.cnn").write_text(TINY)
    monkeypatch.setenv("CNNC_THREADS", "abc")
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 5, 5), np.float32))
    line = one_line_error(cnnc_cmd(tmp_path, "run", "tiny.cnn", "--input", "x.npy"))
    assert line.startswith("cnnc: CNNC_THREADS must be a whole number of threads from 1 to ")
