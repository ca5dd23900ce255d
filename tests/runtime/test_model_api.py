"""The ``Model`` API: input and label validation, parameters, save/load, summary, compile options, seeds."""

from __future__ import annotations

import os

import numpy as np
import pytest

import cnnc
from cnnc_runtime.inputs import Inputs
from tests.reference import MLP, NETWORKS, build

MODERN = NETWORKS["lenet_modern"]  # input 1x28x28
LENET5 = NETWORKS["lenet5"]  # input 1x32x32, connect table in c3
EXPECTED = "expected input of shape (N, 1, 28, 28)"

TINY = """
network tiny {
    input x: 2x5x5
    a = x -> conv(3, 3x3) -> relu
    b = a -> flatten -> dense(4)
}
"""


@pytest.fixture(scope="module")
def modern():
    return build(MODERN)


@pytest.fixture(scope="module")
def mlp():
    return build(MLP)


def images(n: int, seed: int = 0, shape=(1, 28, 28)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


# ---- inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 28, 28), (2, 1, 29, 27), (28, 28), (2, 1, 1, 28, 28),
                                   (784,), ()])
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_wrong_shape_names_the_expected_shape(modern, shape, dtype) -> None:
    got = "(" + ", ".join(str(d) for d in shape) + ")"
    with pytest.raises(ValueError) as e:
        modern(np.zeros(shape, dtype))
    assert str(e.value).startswith(f"{EXPECTED}, got {got}")


def test_exact_message_for_a_32x32_batch(modern) -> None:
    with pytest.raises(ValueError, match=r"^expected input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\): images "
                                         r"of 32x32 are larger than the network input shape \(1, 28, 28\)$"):
        modern(np.zeros((2, 1, 32, 32), np.float32))


def test_smaller_images_and_other_layouts_are_prepared_whatever_the_dtype(modern) -> None:
    """The input rule (cnnc_runtime.inputs): (N, H, W) gains a channel axis, smaller images are zero-padded."""
    x = images(2, shape=(1, 28, 27))
    padded = np.zeros((2, 1, 28, 28), np.float32)
    padded[:, :, :, :27] = x  # 1 column to add: 0 on the left, 1 on the right
    np.testing.assert_array_equal(modern(x), modern(padded))
    np.testing.assert_array_equal(modern(x[:, 0]), modern(padded))
    np.testing.assert_array_equal(modern(padded[0]), modern(padded[:1]))  # (1, 28, 28): one image (N, H, W)


def test_vector_input_message(mlp) -> None:
    with pytest.raises(ValueError, match=r"^expected input of shape \(N, 64\), got \(3, 65\): images of shape "
                                         r"\(65,\) have 65 values; the network expects flat inputs of shape \(64,\)$"):
        mlp(np.zeros((3, 65)))


def test_empty_batch_is_refused(modern) -> None:
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, 28, 28\).*N >= 1"):
        modern(np.zeros((0, 1, 28, 28), np.float32))


@pytest.mark.parametrize("bad", [
    np.full((2, 1, 28, 28), "a"),
    np.zeros((2, 1, 28, 28), dtype=object),
    "not an image",
    [[["a"] * 28] * 28],
    np.zeros((2, 1, 28, 28), dtype=np.complex64),
    np.zeros((2, 1, 28, 28), dtype=np.complex128),
    np.zeros((2, 1, 28, 28), dtype="datetime64[s]"),
    [[1.0, 2.0], [3.0]],  # ragged
    None,
])
def test_non_numeric_inputs_are_refused(modern, bad) -> None:
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, 28, 28\)"):
        modern(bad)


def test_value_and_grad_checks_the_input_too(modern) -> None:
    with pytest.raises(ValueError, match=r"^expected input of shape \(N, 1, 28, 28\), got \(2, 1, 32, 32\): "):
        modern.value_and_grad(np.zeros((2, 1, 32, 32), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="N >= 1"):
        modern.value_and_grad(np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64))


def test_inputs_for_another_network_are_refused(modern) -> None:
    """An Inputs set hands out batches prepared for its input shape: it must be this network's."""
    y = np.zeros(4, dtype=np.int64)
    assert modern.input_shape == (1, 28, 28)
    with pytest.raises(ValueError, match=r"this network takes \(1, 28, 28\)"):
        modern.evaluate(Inputs(np.zeros((4, 1, 32, 32), np.float32), (1, 32, 32)), y)
    for ok in (Inputs(np.zeros((4, 1, 28, 28), np.float32), (1, 28, 28)),
               Inputs(np.zeros((4, 1, 28, 28), np.float64), (1, 28, 28))):
        assert modern.inputs(ok) is ok


def test_list_of_lists_is_accepted(modern, mlp) -> None:
    x = images(2)
    np.testing.assert_array_equal(modern(x.tolist()), modern(x))
    v = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(mlp(v.tolist()), mlp(v))
    np.testing.assert_array_equal(mlp([list(v[0])]), mlp(v[:1]))


def test_other_dtypes_and_layouts_are_converted(modern) -> None:
    x = images(3)
    want = modern(x)
    np.testing.assert_array_equal(modern(x.astype(np.float64)), want)
    u8 = np.random.default_rng(2).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(modern(u8), modern(u8.astype(np.float32) / np.float32(255)))  # stored images
    np.testing.assert_array_equal(modern(u8[:, 0]), modern(u8))
    np.testing.assert_array_equal(modern(u8.astype(np.int64)), modern(u8.astype(np.float32)))
    np.testing.assert_array_equal(modern(u8.astype(bool)), modern(u8.astype(bool).astype(np.float32)))
    transposed = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # same values, F-ordered rows
    assert not transposed.flags.c_contiguous
    np.testing.assert_array_equal(modern(transposed), want)
    wide = np.zeros((6, 1, 28, 56), np.float32)
    wide[::2, :, :, ::2] = x
    strided = wide[::2, :, :, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(modern(strided), want)
    fortran = np.asfortranarray(x)
    np.testing.assert_array_equal(modern(fortran), want)
    v_want, g_want = modern.value_and_grad(x, np.array([1, 2, 3]))
    v, g = modern.value_and_grad(strided.astype(np.float64), [1, 2, 3])
    assert v == v_want
    for k in g:
        np.testing.assert_array_equal(g[k], g_want[k])


def test_input_is_not_modified(modern) -> None:
    x = images(2)
    before = x.copy()
    modern(x)
    modern.value_and_grad(x, np.array([0, 1]))
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 300])
def test_any_batch_size(modern, n: int) -> None:
    x = images(300, seed=3)[:n]
    y = modern(x)
    assert y.shape == (n, 10) and np.isfinite(y).all()
    # each image's output does not depend on the batch it came in (nor on the 256-image chunks)
    for i in {0, n // 2, n - 1}:
        np.testing.assert_array_equal(y[i], modern(x[i:i + 1])[0])
    assert modern.predict(x).shape == (n,)


# ---- labels and targets ---------------------------------------------------------------------


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 10]), "label 10 is out of range: the network has 10 outputs"),
    (np.array([-1, 3]), "label -1 is out of range"),
    (np.array([0, 1, 2]), "expected 2 integer labels"),
    (np.array([0]), "expected 2 integer labels"),
    (np.array([[0], [1]]), "expected 2 integer labels"),
    (np.array([0.0, 1.0]), "expected 2 integer labels"),
    (np.array([0.5, 1.0], np.float32), "expected 2 integer labels"),
    (np.array(["a", "b"]), "expected 2 integer labels"),
])
def test_bad_cross_entropy_labels(modern, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        modern.value_and_grad(images(2), labels, loss="cross_entropy")


@pytest.mark.parametrize("targets", [
    np.array([0, 10]),  # integer labels out of range
    np.zeros((2, 9), np.float32),
    np.zeros((3, 10), np.float32),
    np.zeros((20, 1), np.float32),
])
def test_bad_mse_targets(modern, targets) -> None:
    with pytest.raises(ValueError):
        modern.value_and_grad(images(2), targets, loss="mse")


def test_unknown_loss(modern) -> None:
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        modern.value_and_grad(images(2), np.array([0, 1]), loss="hinge")


def test_labels_as_a_list_are_accepted(modern) -> None:
    v1, _ = modern.value_and_grad(images(2), [3, 4])
    v2, _ = modern.value_and_grad(images(2), np.array([3, 4], np.uint8))
    assert v1 == v2


# ---- parameters --------------------------------------------------------------------------------

LENET5_SHAPES = {
    "c1.weight": (6, 1, 5, 5), "c1.bias": (6,),
    "c3.weight": (16, 6, 5, 5), "c3.bias": (16,),
    "c5.weight": (120, 16, 5, 5), "c5.bias": (120,),
    "f6.weight": (84, 120), "f6.bias": (84,),
    "logits.weight": (10, 84), "logits.bias": (10,),
}


def test_param_names_and_shapes_follow_the_language() -> None:
    model = build(LENET5)
    assert {k: v.shape for k, v in model.params.items()} == LENET5_SHAPES
    assert all(v.dtype == np.float32 for v in model.params.values())
    assert set(build(MLP).params) == {"h1.weight", "h1.bias", "h2.weight", "logits.weight", "logits.bias"}


def test_block_parameter_names_are_prefixed() -> None:
    shapes = {k: v.shape for k, v in build(NETWORKS["resnet"]).params.items()}
    # residual(4) * 2 in binding stage1: copies 1 and 2, binding y inside the block, two convs y.1 and y.2
    assert shapes == {
        "stem.weight": (4, 3, 3, 3), "stem.bias": (4,),
        "stage1.1.y.1.weight": (4, 4, 3, 3), "stage1.1.y.1.bias": (4,),
        "stage1.1.y.2.weight": (4, 4, 3, 3), "stage1.1.y.2.bias": (4,),
        "stage1.2.y.1.weight": (4, 4, 3, 3), "stage1.2.y.1.bias": (4,),
        "stage1.2.y.2.weight": (4, 4, 3, 3), "stage1.2.y.2.bias": (4,),
        "stage2.y.weight": (8, 4, 3, 3), "stage2.y.bias": (8,),
        "logits.weight": (5, 8), "logits.bias": (5,),
    }


def test_writing_into_params_changes_the_output() -> None:
    model = build(LENET5)
    x = images(2, shape=(1, 32, 32))
    before = model(x)
    model.params["logits.bias"][3] += 1.5
    after = model(x)
    np.testing.assert_allclose(after[:, 3] - before[:, 3], 1.5, rtol=1e-5)
    np.testing.assert_array_equal(np.delete(after, 3, axis=1), np.delete(before, 3, axis=1))
    model.params["c1.weight"][...] = 0.0
    model.params["c1.bias"][...] = 0.0
    flat = model(x)
    np.testing.assert_allclose(flat[0], flat[1], rtol=0, atol=1e-6)  # c1's output is 0 for every image


def test_first_weights_come_from_the_train_sections_seed_unless_given() -> None:
    seeded = TINY.replace("}\n", "}\ntrain {\n    seed 3\n}\n", 1)
    from_file = cnnc.compile_string(seeded)
    assert from_file.manifest["train"]["seed"] == 3
    np.testing.assert_array_equal(from_file.flat_params, cnnc.compile_string(TINY, seed=3).flat_params)
    assert not np.array_equal(from_file.flat_params, cnnc.compile_string(TINY).flat_params)  # no seed: 0
    np.testing.assert_array_equal(cnnc.compile_string(seeded, seed=0).flat_params,
                                  cnnc.compile_string(TINY).flat_params)


def test_state_returns_copies() -> None:
    model = build(TINY)
    state = model.state()
    state["a.bias"][...] = 9.0
    assert not (model.params["a.bias"] == 9.0).any()


# ---- save and load ------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path) -> None:
    model = build(LENET5, seed=1)
    model.params["logits.bias"][...] = np.arange(10)
    path = tmp_path / "w.npz"
    model.save(path)
    with np.load(path) as data:
        assert set(data.keys()) == set(LENET5_SHAPES)
        for k, v in model.params.items():
            np.testing.assert_array_equal(data[k], v)
    other = build(LENET5, seed=2)
    x = images(3, shape=(1, 32, 32))
    assert not np.array_equal(other(x), model(x))
    other.load(path)
    np.testing.assert_array_equal(other(x), model(x))
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]  # no temporary files left behind
    # overwriting is atomic: the file is replaced by a complete new one
    model.params["logits.bias"][...] = -1.0
    model.save(path)
    other.load(path)
    np.testing.assert_array_equal(other.params["logits.bias"], -1.0)
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]


def test_failed_save_leaves_the_old_file(tmp_path) -> None:
    model = build(TINY)
    path = tmp_path / "w.npz"
    model.save(path)
    before = path.read_bytes()
    with pytest.raises(OSError):
        model.save(tmp_path / "missing-dir" / "w.npz")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]


def _saved(tmp_path, arrays: dict) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def test_load_refuses_a_missing_name(tmp_path) -> None:
    model = build(TINY)
    arrays = model.state()
    del arrays["b.bias"]
    with pytest.raises(ValueError, match=r"missing b\.bias"):
        model.load(_saved(tmp_path, arrays))


def test_load_refuses_an_extra_name(tmp_path) -> None:
    model = build(TINY)
    arrays = model.state() | {"c9.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected c9\.weight"):
        model.load(_saved(tmp_path, arrays))


def test_load_refuses_a_wrong_shape_and_changes_nothing(tmp_path) -> None:
    model = build(TINY)
    before = model.state()
    arrays = {k: v + 1.0 for k, v in before.items()}
    arrays["a.weight"] = np.zeros((3, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"a\.weight has shape \(3, 2, 2, 2\), the network needs \(3, 2, 3, 3\)"):
        model.load(_saved(tmp_path, arrays))
    for k, v in before.items():
        np.testing.assert_array_equal(model.params[k], v)  # nothing was half-loaded


def test_load_refuses_unreadable_files(tmp_path) -> None:
    model = build(TINY)
    with pytest.raises(ValueError, match="nope.npz"):
        model.load(tmp_path / "nope.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an npz file at all")
    with pytest.raises(ValueError):
        model.load(garbage)


def test_load_refuses_a_corrupt_npz(tmp_path) -> None:
    model = build(TINY)
    model.save(tmp_path / "w.npz")
    data = (tmp_path / "w.npz").read_bytes()
    (tmp_path / "w.npz").write_bytes(data[:len(data) // 2])  # a torn copy: zip magic, no central directory
    with pytest.raises(ValueError, match="w.npz"):
        model.load(tmp_path / "w.npz")


# ---- summary, compile errors and options --------------------------------------------------------


def test_summary_lists_layers_and_totals() -> None:
    text = build(LENET5).summary()
    for name in ("c1", "s2", "c3", "s4", "c5", "f6", "logits"):
        assert name in text
    assert "60,806" in text
    assert "1,516" in text  # C3 with its connection table


def test_compile_string_reports_mistakes_as_cnn_errors() -> None:
    with pytest.raises(cnnc.CnnError, match="maxpol"):
        cnnc.compile_string("network n {\n  input x: 1x8x8\n  y = x -> maxpol(2x2)\n}\n", name="bad.cnn")
    with pytest.raises(cnnc.CnnError):
        cnnc.compile_string("network n {\n  input x: 1x4x4\n  y = x -> conv(2, 5x5)\n}\n")
    with pytest.raises(cnnc.CnnError):
        cnnc.compile_string("network n { input x: 1x4x4 y = x -> ")


def test_unknown_compile_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="optimise"):
        cnnc.compile_string(TINY, optimise=True)


def test_winograd_can_be_turned_off(tmp_path, monkeypatch) -> None:
    """The same network with direct convolutions only: another artifact, the same function within rounding."""
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    fast = cnnc.compile_string(NETWORKS["vgg_wide"])
    direct = cnnc.compile_string(NETWORKS["vgg_wide"], winograd=False)
    assert fast.manifest["cache_key"] != direct.manifest["cache_key"]
    assert fast.manifest["ws_floats"] > direct.manifest["ws_floats"]  # Winograd's transforms need room
    x = np.random.default_rng(0).standard_normal((3, *fast.input_shape)).astype(np.float32)
    np.testing.assert_allclose(fast(x), direct(x), rtol=1e-5, atol=1e-6)
    (lf, gf), (ld, gd) = fast.value_and_grad(x, [1, 2, 3]), direct.value_and_grad(x, [1, 2, 3])
    assert lf == pytest.approx(ld, rel=1e-5)
    for k in gf:
        np.testing.assert_allclose(gf[k], gd[k], rtol=1e-4, atol=1e-5 * np.abs(gd[k]).max(), err_msg=k)


def test_seeds(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))  # compiled once; the other seeds hit the cache
    a = cnnc.compile_string(TINY, seed=5)
    b = cnnc.compile_string(TINY, seed=5)
    c = cnnc.compile_string(TINY, seed=6)
    d = cnnc.compile_string(TINY)
    assert d.state().keys() == a.state().keys()
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["a.weight"], c.params["a.weight"])
    assert not np.array_equal(a.params["b.weight"], d.params["b.weight"])
    np.testing.assert_array_equal(d.params["b.weight"], build(TINY).params["b.weight"])  # default seed 0
    assert not a.params["a.bias"].any()  # biases start at zero
    # initialize(seed) reproduces the compile-time initialisation
    c.initialize(5)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], c.params[k])


def test_connect_table_weights_outside_the_table_are_zero_after_init() -> None:
    for seed in (0, 1, 2):
        model = build(LENET5, seed=seed)
        p = next(p for p in model.manifest["params"] if p["name"] == "c3.weight")
        mask = model.connect_mask(p)
        assert mask.sum() == 60
        w = model.params["c3.weight"]
        assert not w[mask == 0].any()
        assert (np.abs(w[mask == 1]).sum(axis=(1, 2)) > 0).all()


def test_initial_weight_scale() -> None:
    """He (sqrt(2/fan_in)) before a ReLU, LeCun (sqrt(1/fan_in)) otherwise."""
    model = build(NETWORKS["lenet_modern"], seed=4)
    w = model.params["f5.weight"]  # dense(120) on 400 inputs, then relu
    assert w.std() == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    w = model.params["logits.weight"]  # dense(10) on 84, no activation
    assert w.std() == pytest.approx(np.sqrt(1 / 84), rel=0.15)
