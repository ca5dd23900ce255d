"""One ``Model`` used from several Python threads, after a fork, and with any number of pool threads.

Every call made while other threads call the same model must give exactly
what it gives alone; a process forked after the pool started must still run
large batches; gradients must not depend on how many threads summed them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from cnnc_runtime.model import Model
from tests.reference import NETWORKS, build

SIZES = (1, 3, 8, 37, 300)
ROUNDS = 6


@pytest.fixture(scope="module")
def compiled():
    m = build(NETWORKS["lenet_modern"])
    return m.manifest, m._obj


def model_with(compiled, threads: int) -> Model:
    manifest, obj = compiled
    return Model(manifest, obj, threads=threads)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, 10, n)


def run_together(jobs: list[Callable[[], None]]) -> None:
    """Start every job at once on its own thread; re-raise the first failure."""
    start = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def body(job: Callable[[], None]) -> None:
        start.wait()
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - reported on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def forward_job(model: Model, x: np.ndarray, expected: np.ndarray) -> Callable[[], None]:
    def job() -> None:
        for _ in range(ROUNDS):
            got = model(x)
            assert np.array_equal(got, expected), f"batch {len(x)}: max error {np.abs(got - expected).max()}"
    return job


def gradient_job(model: Model, x: np.ndarray, y: np.ndarray, expected: tuple[float, dict]) -> Callable[[], None]:
    def job() -> None:
        for _ in range(ROUNDS):
            value, grads = model.value_and_grad(x, y)
            assert value == expected[0]
            assert all(np.array_equal(grads[k], expected[1][k]) for k in grads)
    return job


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_calling_one_model_with_different_batch_sizes_get_exact_results(compiled, threads):
    model = model_with(compiled, threads)
    batches = {n: images(n, seed=n) for n in SIZES}
    expected = {n: model(x) for n, x in batches.items()}
    run_together([forward_job(model, batches[n], expected[n]) for n in SIZES])


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_calling_one_model_with_equal_batch_sizes_get_exact_results(compiled, threads):
    model = model_with(compiled, threads)
    jobs = []
    for n in (3, 37):
        for seed in range(2):
            x = images(n, seed=10 * n + seed)
            jobs.append(forward_job(model, x, model(x)))
    run_together(jobs)


@pytest.mark.parametrize("threads", [1, 2])
def test_gradients_and_inference_on_several_threads_are_exact(compiled, threads):
    model = model_with(compiled, threads)
    xa, ya, xb, yb = images(64, 1), labels(64, 1), images(5, 2), labels(5, 2)
    small, large = images(3, 3), images(300, 4)
    run_together([gradient_job(model, xa, ya, model.value_and_grad(xa, ya)),
                  gradient_job(model, xb, yb, model.value_and_grad(xb, yb)),
                  forward_job(model, small, model(small)), forward_job(model, large, model(large))])
