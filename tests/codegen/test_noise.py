"""Input jitter drawn natively: Gaussian, reproducible per seed, and the same however the batch is split."""

from __future__ import annotations

import numpy as np

from cnnc.codegen.elementwise import emit_gaussian_noise
from cnnc.codegen.specs import NoiseSpec

SIZE = 1000
N = 300


def noise(jit, seed: int, sigma: float, ranges=((0, N),), stride: int = SIZE, image0: int = 0) -> np.ndarray:
    x = np.zeros(N * stride, np.float32)
    for n0, n1 in ranges:
        jit("noise", x, seed, image0, sigma, n0, n1)
    return x.reshape(N, stride)


def test_noise_is_standard_normal_times_sigma(jit):
    emit_gaussian_noise(jit.module, "noise", NoiseSpec(SIZE), jit.vw)
    z = noise(jit, seed=7, sigma=0.5).ravel().astype(np.float64) / 0.5
    se = 1 / np.sqrt(z.size)  # 300,000 samples: mean, variance, skew, kurtosis within a few standard errors
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(((z - z.mean()) ** 3).mean()) < 5 * np.sqrt(6) * se
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 5 * np.sqrt(24) * se
    assert abs((np.abs(z) > 1.96).mean() - 0.05) < 0.003  # the tails too, not just the moments
    assert np.abs(z).max() < 7


def test_noise_is_reproducible_and_split_invariant(jit):
    emit_gaussian_noise(jit.module, "noise", NoiseSpec(SIZE, x_stride=SIZE + 3), jit.vw)
    whole = noise(jit, 3, 1.0, stride=SIZE + 3)
    split = noise(jit, 3, 1.0, ranges=((0, 17), (17, 200), (200, N)), stride=SIZE + 3)
    np.testing.assert_array_equal(whole, split)
    assert np.all(whole[:, SIZE:] == 0)  # the gaps between images are not touched
    other = noise(jit, 4, 1.0, stride=SIZE + 3)
    assert not np.array_equal(whole, other)
    # neighbouring elements and images are uncorrelated
    flat = whole[:, :SIZE].astype(np.float64)
    assert abs(np.corrcoef(flat[:, :-1].ravel(), flat[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(flat[:-1].ravel(), flat[1:].ravel())[0, 1]) < 0.01


def test_noise_follows_the_image_index_in_the_whole_batch(jit):
    """A batch cut into pieces that start at image0 (chunks, MPI ranks) gets the noise of the whole batch."""
    emit_gaussian_noise(jit.module, "noise", NoiseSpec(SIZE), jit.vw)
    whole = noise(jit, 5, 1.0)
    shifted = noise(jit, 5, 1.0, image0=100)  # image n of this call is image 100 + n of the whole batch
    np.testing.assert_array_equal(shifted[:N - 100], whole[100:])
