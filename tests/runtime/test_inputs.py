"""The one input rule (``cnnc_runtime.inputs``): layout, scale, padding and the train section's normalize,
the same for every dtype and every way in (``model(x)``, ``fit``, ``evaluate``, the CLI)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc_runtime.inputs import Inputs, normalization, prepare_images
from tests.reference import PADDED, build


@pytest.fixture(scope="module")
def padnet():
    return build(PADDED)


def stored_images(n: int = 12, seed: int = 0) -> np.ndarray:
    """uint8 (n, 6, 6) images, as a dataset stores them."""
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 6)).astype(np.uint8)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _prepared(x: np.ndarray, shape, norm) -> np.ndarray:
    """The rule on a whole set, spelled out: prepare_images, then (x - mean) / std in float32."""
    out = prepare_images(x, shape)
    return (out - np.float32(norm["mean"])) / np.float32(norm["std"]) if norm else out


# ---- the rule, through the model ----------------------------------------------------------------------


def test_uint8_and_float_images_are_the_same_input(padnet):
    """uint8 is scaled by 1/255, float taken as it is; both are padded 6x6 -> 8x8 and normalized."""
    u8 = stored_images()
    f32 = u8.astype(np.float32) / np.float32(255)
    want = _prepared(u8, (1, 8, 8), {"mean": 0.2, "std": 0.7})
    for x in (u8, f32, f32.astype(np.float64), f32[:, None], f32[:, :, :, None]):
        np.testing.assert_array_equal(_bits(padnet.prepare(x)), _bits(want))
    np.testing.assert_array_equal(padnet(u8), padnet(f32))
    np.testing.assert_array_equal(padnet.predict(u8), padnet.predict(f32))


def test_float_network_inputs_are_normalized_too(padnet):
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    np.testing.assert_array_equal(padnet.prepare(x), (x - np.float32(0.2)) / np.float32(0.7))
    out = np.empty((3, 3), np.float32)
    np.testing.assert_array_equal(padnet.infer_into(padnet.prepare(x), out), padnet(x))


def test_without_normalize_float_network_inputs_are_not_copied():
    model = build(PADDED.split("train")[0])
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    assert model.prepare(x) is x
    assert model.inputs(x).direct


def test_training_on_uint8_equals_training_on_the_same_float_images():
    u8 = stored_images(64)
    y = np.arange(64) % 3
    results = []
    for x in (u8, u8.astype(np.float32) / np.float32(255)):
        model = build(PADDED, seed=1)
        h = model.fit(x, y, epochs=2, batch=16, validation=0.25, jitter=0.05, seed=3, progress=False)
        results.append((model.flat_params.copy(), [(e.loss, e.val_loss) for e in h.epochs], model.evaluate(x, y)))
    np.testing.assert_array_equal(_bits(results[0][0]), _bits(results[1][0]))
    assert results[0][1:] == results[1][1:]


@pytest.mark.parametrize("shape, detail", [
    ((2, 1, 9, 8), r"images of 9x8 are larger than the network input shape \(1, 8, 8\)"),
    ((2, 3, 8, 8), r"images of shape \(3, 8, 8\) have 3 channel\(s\) read as \(N, C, H, W\)"),
    ((2, 10), r"flat inputs of 10 values do not fit"),
    ((2, 1, 1, 8, 8), r"expected images \(N, H, W\) or \(N, C, H, W\)"),
])
def test_what_cannot_be_prepared_names_the_expected_shape(padnet, shape, detail):
    for dtype in (np.uint8, np.float32):
        with pytest.raises(ValueError, match=r"^expected input of shape \(N, 1, 8, 8\), got .*: " + detail):
            padnet(np.zeros(shape, dtype))


# ---- prepare_images (the whole set) and Inputs (a batch at a time) ---------------------------------------


def test_prepare_images_scales_and_pads():
    x = np.full((2, 28, 28), 255, np.uint8)
    x[1, 0, 0] = 51
    out = prepare_images(x, (1, 32, 32))
    assert out.shape == (2, 1, 32, 32) and out.dtype == np.float32
    assert out[0, 0, 2:30, 2:30].min() == 1.0 and out.sum() == pytest.approx(2 * 28 * 28 - 1 + 0.2, rel=1e-6)
    assert out[1, 0, 2, 2] == np.float32(51) / np.float32(255)
    # odd margins: 3 rows -> 1 above, 2 below
    y = prepare_images(np.ones((1, 3, 2, 2), np.float32), (3, 5, 4))
    assert y[0, :, 1:3, 1:3].min() == 1.0 and y.sum() == 12
    # already the right size: float data passes unscaled
    z = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float64)
    np.testing.assert_array_equal(prepare_images(z, (1, 8, 8)), z.astype(np.float32))


def test_prepare_images_flat():
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = prepare_images(x, (9,))
    assert out.shape == (2, 9) and out.dtype == np.float32
    np.testing.assert_array_equal(out, x.reshape(2, 9) / np.float32(255))
    np.testing.assert_array_equal(prepare_images(out, (1, 3, 3))[:, 0], x / np.float32(255))


def test_prepare_images_errors():
    x = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"larger .*\(1, 24, 24\)"):
        prepare_images(x, (1, 24, 24))
    with pytest.raises(ValueError, match=r"1 channel.*\(3, 32, 32\)"):
        prepare_images(x, (3, 32, 32))
    with pytest.raises(ValueError, match=r"784 values.*\(1024,\)"):
        prepare_images(x, (1024,))
    with pytest.raises(ValueError, match="neither"):
        prepare_images(x, (28, 28))


def test_prepare_images_accepts_channels_last():
    x = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)  # (N, H, W, C), as Keras stores images
    out = prepare_images(x, (3, 4, 5))
    assert out.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(out, x.transpose(0, 3, 1, 2).astype(np.float32) / 255)


@pytest.mark.parametrize(("stored", "shape"), [
    ((7, 5, 6), (1, 9, 8)),  # (N, H, W), padded (asymmetric margins)
    ((7, 1, 5, 6), (1, 5, 6)),  # (N, C, H, W), no padding
    ((7, 5, 6, 3), (3, 7, 6)),  # channels last, padded
    ((7, 4, 4), (16,)),  # flat network input
], ids=["hw-pad", "chw", "hwc-pad", "flat"])
@pytest.mark.parametrize("norm", [None, {"mean": 0.1307, "std": 0.3081}], ids=["plain", "normalize"])
def test_inputs_batches_equal_the_whole_set_prepared(stored, shape, norm):
    x = np.random.default_rng(0).integers(0, 256, stored, dtype=np.uint8)
    want = _prepared(x, shape, norm)
    inputs = Inputs(x, shape, norm)
    buf = np.full((4, *shape), np.nan, np.float32)  # stale values must not leak into a batch
    for idx in (np.array([3, 0, 6]), np.array([5]), slice(2, 6)):
        got = inputs.batch(idx, buf)
        assert got.shape == want[idx].shape and np.shares_memory(got, buf)
        np.testing.assert_array_equal(_bits(got), _bits(want[idx]))
    chunks = np.concatenate([c.copy() for c in inputs.chunks(3, buf)])
    np.testing.assert_array_equal(_bits(chunks), _bits(want))


def test_inputs_subsets_are_index_views():
    x = np.random.default_rng(1).integers(0, 256, (10, 3, 3), dtype=np.uint8)
    want = prepare_images(x, (1, 3, 3))
    rows = np.array([9, 2, 4, 7])
    sub = Inputs(x, (1, 3, 3)).subset(rows)
    assert len(sub) == 4
    buf = np.empty((4, 1, 3, 3), np.float32)
    np.testing.assert_array_equal(sub.batch(np.array([1, 3]), buf), want[[2, 7]])
    np.testing.assert_array_equal(sub.subset(np.array([0, 2])).batch(slice(None), buf), want[[9, 4]])
    f = Inputs(want, (1, 3, 3)).subset(rows)  # float inputs: gathered as they are
    np.testing.assert_array_equal(f.batch(slice(0, 4), buf), want[rows])
    np.testing.assert_array_equal(np.concatenate(list(Inputs(want, (1, 3, 3)).chunks(3, buf))), want)


def test_inputs_reject_images_that_do_not_fit():
    x = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(ValueError, match=r"larger than the network input shape \(1, 24, 24\)"):
        Inputs(x, (1, 24, 24))
    with pytest.raises(ValueError, match=r"have 1 channel, as \(N, H, W\); the network expects 3 channel\(s\): "
                                         r"input shape \(3, 32, 32\)"):
        Inputs(x, (3, 32, 32))
    with pytest.raises(ValueError, match=r"flat inputs of shape \(100,\)"):
        Inputs(x, (100,))


@pytest.mark.parametrize("shape, got", [
    ((2, 28, 28, 3), r"images of shape \(28, 28, 3\) have 28 channel\(s\) read as \(N, C, H, W\), or 3 read as "
                     r"channels-last \(N, H, W, C\); the network expects 1 channel\(s\): input shape \(1, 28, 28\)"),
    ((2, 3, 28, 28), r"images of shape \(3, 28, 28\) have 3 channel\(s\) read as \(N, C, H, W\), or 28 read as "
                     r"channels-last"),
])
def test_a_channel_mismatch_names_both_readings_of_the_shape(shape, got):
    with pytest.raises(ValueError, match=got):
        Inputs(np.zeros(shape, np.uint8), (1, 28, 28))


# ---- per-channel normalization ------------------------------------------------------------------


def test_per_channel_normalize_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (5, 3, 6, 6), dtype=np.uint8)
    norm = {"mean": [0.5, 0.25, 0.125], "std": [0.5, 2.0, 0.25]}
    out = np.empty((5, 3, 8, 8), np.float32)
    got = Inputs(x, (3, 8, 8), norm).batch(np.arange(5), out)
    ref = np.zeros((5, 3, 8, 8), np.float32)
    ref[:, :, 1:7, 1:7] = x.astype(np.float32) / 255
    ref = (ref - np.float32(norm["mean"]).reshape(3, 1, 1)) / np.float32(norm["std"]).reshape(3, 1, 1)
    np.testing.assert_array_equal(got, ref)


def test_normalization_errors():
    with pytest.raises(ValueError, match="has 2 values; the input has 3 channel"):
        normalization({"mean": [0.1, 0.2], "std": 1.0}, (3, 4, 4))
    with pytest.raises(ValueError, match="std must be positive"):
        normalization({"mean": 0.0, "std": [1.0, 0.0, 1.0]}, (3, 4, 4))
    assert normalization(None, (3, 4, 4)) is None
