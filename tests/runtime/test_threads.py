"""One ``Model`` used from several Python threads, after a fork, and with any number of pool threads.

Every call made while other threads call the same model must give exactly
what it gives alone; a process forked after the pool started must still run
large batches; gradients must not depend on how many threads summed them.
"""

from __future__ import annotations

import multiprocessing
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


# ---- a fork after the pool started ------------------------------------------------------------------


def _run_in_child(model: Model, x: np.ndarray, y: np.ndarray, results) -> None:
    results.put((model(x), model.value_and_grad(x, y)))


def results_of_a_fork(model: Model, x: np.ndarray, y: np.ndarray) -> tuple:
    """What a forked child computes for (x, y): model(x) and value_and_grad; fails (not hangs) if it is stuck."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_run_in_child, args=(model, x, y, results))
    child.start()
    try:
        return results.get(timeout=30)
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()


def assert_same_results(got: tuple, model: Model, x: np.ndarray, y: np.ndarray) -> None:
    out, (value, grads) = got
    want_value, want_grads = model.value_and_grad(x, y)
    assert np.array_equal(out, model(x))
    assert value == want_value
    assert all(np.array_equal(grads[k], want_grads[k]) for k in grads)


needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork here")


@needs_fork
def test_a_process_forked_after_the_pool_started_runs_large_batches(compiled):
    model = model_with(compiled, 2)
    x, y = images(37), labels(37)
    model(x)  # the pool's threads are running now
    assert_same_results(results_of_a_fork(model, x, y), model, x, y)


@needs_fork
def test_a_fork_while_another_thread_trains_leaves_the_child_a_usable_model(compiled):
    """A model lock held by another thread at the fork would be held for ever in the child: it gets a new one."""
    model = model_with(compiled, 2)
    x, y = images(37), labels(37)
    model(x)
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with model.lock:  # as a training step on that thread would at the moment of the fork
            held.set()
            release.wait()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    assert held.wait(timeout=10)
    try:
        got = results_of_a_fork(model, x, y)
    finally:
        release.set()
        holder.join()
    assert_same_results(got, model, x, y)


def test_two_models_fitted_on_two_threads_end_as_each_does_alone(compiled):
    """fit on two threads at once, on two models that share nothing: the same bits as one after the other."""
    x, y = images(96, 5), labels(96, 5)
    alone = [model_with(compiled, 2) for _ in range(2)]
    together = [model_with(compiled, 2) for _ in range(2)]
    for m, seed in zip(alone + together, (1, 2, 1, 2)):
        m.initialize(seed)
    for m in alone:
        m.fit(x, y, epochs=2, batch=16, validation=0, progress=False)
    run_together([lambda m=m: m.fit(x, y, epochs=2, batch=16, validation=0, progress=False) for m in together])
    for a, b in zip(alone, together):
        assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_one_model_fitted_and_called_on_several_threads_stays_usable(compiled):
    """Two fits and inference on one model at once: the steps take turns (a mix of both runs), never a crash, a
    hang or a weight that is not finite."""
    model = model_with(compiled, 2)
    x, y = images(96, 6), labels(96, 6)
    fit = lambda: model.fit(x, y, epochs=2, batch=16, validation=0, progress=False)  # noqa: E731
    run_together([fit, fit, lambda: [model(x[:7]) for _ in range(20)]])
    assert all(np.isfinite(v).all() for v in model.params.values())
    assert model.evaluate(x, y)[0] < model_with(compiled, 2).evaluate(x, y)[0]  # it did learn


_loader_model: Model | None = None  # (what a DataLoader's forked workers see: the parent's globals)


def _scores_of_batch(seed: int) -> np.ndarray:
    return _loader_model(images(5, seed))


@needs_fork
def test_a_forked_pool_of_workers_uses_the_parents_model(compiled):
    """multiprocessing's 'fork' workers, as a data loader makes them, each run the model their parent made."""
    global _loader_model
    _loader_model = model_with(compiled, 2)
    _loader_model(images(37))  # the parent's pool threads run; the workers have none
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map_async(_scores_of_batch, range(6)).get(timeout=60)
    finally:
        model, _loader_model = _loader_model, None
    for seed, scores in enumerate(got):
        assert np.array_equal(scores, model(images(5, seed)))


# ---- gradients do not depend on the number of threads ------------------------------------------------


@pytest.mark.parametrize("n", [5, 37, 64, 300])
def test_gradients_are_the_same_bits_on_any_number_of_threads(compiled, n):
    x, y = images(n, 7), labels(n, 7)
    got = [model_with(compiled, k).value_and_grad(x, y) for k in (1, 2, 3)]
    for value, grads in got[1:]:
        assert value == got[0][0]
        for name in grads:
            np.testing.assert_array_equal(grads[name], got[0][1][name], err_msg=name)


def test_training_is_the_same_bits_on_any_number_of_threads(compiled):
    x, y = images(200, 8), labels(200, 8)
    trained = []
    for k in (1, 2, 3):
        model = model_with(compiled, k)
        history = model.fit(x, y, epochs=1, batch=64, max_steps=3, jitter=0.1, progress=False)
        trained.append((history.epochs[-1].loss, model.flat_params.copy()))
    for loss, params in trained[1:]:
        assert loss == trained[0][0]
        np.testing.assert_array_equal(params, trained[0][1])


def test_a_models_thread_count_is_fixed_when_it_is_made(compiled):
    """Its per-thread buffers are sized by it: a count changed later (say in fit's on_epoch) made the per-step
    path fail with an IndexError and a native run read and write past its per-thread arrays."""
    model = model_with(compiled, 1)
    with pytest.raises(AttributeError):
        model.threads = 4
    assert model.threads == 1
