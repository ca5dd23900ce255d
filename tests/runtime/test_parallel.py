"""The thread pool: every share runs, errors come back to the caller, and a failing share never leaves work behind."""

from __future__ import annotations

import threading
import time

import pytest

from cnnc_runtime.parallel import Pool, split


def test_split_covers_the_range_in_whole_grains():
    assert split(10, 2, 4) == [(0, 4), (4, 10)]
    assert split(3, 2, 4) == [(0, 3)]
    assert split(64, 2) == [(0, 32), (32, 64)]
    for n in (1, 7, 100, 257):
        parts = split(n, 3, 4)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))


def test_each_task_runs_once_on_its_own_thread():
    pool = Pool(2)
    seen = []
    pool.run([lambda: seen.append(threading.get_ident()), lambda: seen.append(threading.get_ident())])
    assert len(seen) == 2 and len(set(seen)) == 2


def test_a_worker_error_reaches_the_caller():
    pool = Pool(2)

    def boom():
        raise RuntimeError("in a worker")

    with pytest.raises(RuntimeError, match="in a worker"):
        pool.run([lambda: None, boom])
    pool.run([lambda: None, lambda: None])  # and the pool still works


def test_the_callers_error_waits_for_the_workers():
    pool = Pool(2)
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)

    def fail():
        raise ValueError("caller")

    with pytest.raises(ValueError):
        pool.run([fail, slow])
    assert finished == [True]
