"""The native crop-and-flip kernel against a numpy reference of the same draws; split-independence; errors."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic, as the kernel's i64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def draws(seed: int, n: int, pad: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dy, dx, flipped) of images 0..n-1, as documented in cnnc.codegen.augment."""
    key = mix64(np.array([seed % (1 << 63)], dtype=np.uint64))
    h = mix64(np.arange(n, dtype=np.uint64) * GOLDEN + key)
    span = np.uint64(2 * pad + 1)
    dy = (h >> np.uint64(48)) % span
    dx = ((h >> np.uint64(32)) & np.uint64(0xFFFF)) % span
    flipped = ((h >> np.uint64(31)) & np.uint64(1)).astype(bool) & flip
    return dy.astype(int), dx.astype(int), flipped


def reference(x: np.ndarray, seed: int, pad: int, flip: bool, fill: np.ndarray) -> np.ndarray:
    """Pad with `fill` (per channel), crop back at the drawn offset, mirror where drawn: torchvision's order."""
    n, c, h, w = x.shape
    padded = np.empty((n, c, h + 2 * pad, w + 2 * pad), np.float32)
    padded[...] = fill.reshape(1, c, 1, 1)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    dy, dx, flipped = draws(seed, n, pad, flip)
    out = np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flipped] = out[flipped][..., ::-1]
    return out


@pytest.fixture(scope="module")
def model():
    return cnnc.compile_string("network aug { input x: 3x6x7\n y = x -> flatten -> dense(2) }", cache=False)


@pytest.mark.parametrize("pad,flip", [(2, True), (1, False), (0, True), (3, True)])
def test_matches_the_numpy_reference_of_the_same_draws(model, pad, flip):
    x = np.random.default_rng(0).standard_normal((37, 3, 6, 7)).astype(np.float32)
    fill = np.array([-1.5, 0.25, 2.0], np.float32)
    got = x.copy()
    model.augment(got, seed=1234, pad=pad, flip=flip, fill=fill)
    np.testing.assert_array_equal(got, reference(x, 1234, pad, flip, fill))


def test_nothing_drawn_is_the_identity(model):
    x = np.random.default_rng(1).standard_normal((5, 3, 6, 7)).astype(np.float32)
    got = x.copy()
    model.augment(got, seed=9, pad=0, flip=False)
    np.testing.assert_array_equal(got, x)


def test_every_offset_and_both_flips_are_drawn():
    dy, dx, flipped = draws(5, 2000, 2, True)
    assert set(zip(dy, dx)) == {(a, b) for a in range(5) for b in range(5)}
    assert 0.45 < flipped.mean() < 0.55


def test_a_batch_split_anywhere_gets_the_same_images(model):
    """Each image's draws depend on the seed and its place in the batch: how threads share the batch cannot matter."""
    x = np.random.default_rng(2).standard_normal((12, 3, 6, 7)).astype(np.float32)
    whole = x.copy()
    model.augment(whole, seed=77, pad=2, flip=True)
    for cuts in ([0, 5, 12], [0, 1, 2, 7, 12], [0, 12]):
        parts = x.copy()
        for a, b in zip(cuts, cuts[1:]):
            model.augment(parts, seed=77, pad=2, flip=True, rows=(a, b), thread=0)
        np.testing.assert_array_equal(parts, whole)


def test_bad_arguments_are_value_errors(model):
    x = np.zeros((2, 3, 6, 7), np.float32)
    with pytest.raises(ValueError, match="crop pad must be an integer"):
        model.augment(x, seed=0, pad=-1)
    with pytest.raises(ValueError, match=r"shape \(N, 3, 6, 7\)"):
        model.augment(np.zeros((2, 3, 6, 6), np.float32), seed=0, pad=1)
    with pytest.raises(ValueError, match="rows"):
        model.augment(x, seed=0, pad=1, rows=(1, 3))
    with pytest.raises(ValueError, match="thread"):
        model.augment(x, seed=0, pad=1, thread=99)
    with pytest.raises(ValueError, match="fill has 2 values"):
        model.augment(x, seed=0, pad=1, fill=[0.0, 1.0])
    flat = cnnc.compile_string("network augflat { input x: 4\n y = x -> dense(2) }", cache=False)
    with pytest.raises(ValueError, match="image inputs"):
        flat.augment(np.zeros((2, 4), np.float32), seed=0, pad=1)


def test_a_part_of_a_batch_gets_the_draws_of_its_images_in_the_whole_batch(model):
    """A process's share of a data-parallel batch starts at image0: its images are augmented as in the whole."""
    x = np.random.default_rng(3).standard_normal((12, 3, 6, 7)).astype(np.float32)
    whole, part = x.copy(), x[5:].copy()
    model.augment(whole, seed=77, pad=2, flip=True)
    model.augment(part, seed=77, pad=2, flip=True, image0=5)
    np.testing.assert_array_equal(part, whole[5:])
    with pytest.raises(ValueError, match="image0"):
        model.augment(part, seed=77, pad=2, image0=-1)
