"""The thread pool: every share runs, errors come back to the caller, and a failing share never leaves work behind."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cnnc_runtime.parallel import Flag, Pool, available_cores, current_cpu, split


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


def test_ctrl_c_during_a_run_is_raised_once_every_share_is_done():
    """A share may be native code meeting the others at barriers: Ctrl-C (or SIGTERM's handler) must not cut the
    calling thread's share short, or the workers wait at a barrier for ever. The handler runs after the run."""
    pool = Pool(2)
    done = []

    def first() -> None:
        signal.raise_signal(signal.SIGINT)
        done.append(0)  # (still reached: the handler has not run)

    with pytest.raises(KeyboardInterrupt):
        pool.run([first, lambda: done.append(1)])
    assert sorted(done) == [0, 1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    pool.run([lambda: done.append(2), lambda: done.append(3)])  # (and the pool runs on)
    assert sorted(done) == [0, 1, 2, 3]


def test_a_python_handler_of_sigterm_runs_once_after_the_run_and_is_put_back():
    """The handler swapped in during a run is the pool's own: the user's handler gets the signal afterwards, with
    its number, and is the installed handler again."""
    pool = Pool(2)
    got, events = [], []

    def handler(number, frame) -> None:
        got.append(number)
        events.append("handler")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        def first() -> None:
            signal.raise_signal(signal.SIGTERM)
            events.append("share")

        pool.run([first, lambda: None])
        assert got == [signal.SIGTERM] and events == ["share", "handler"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_flag_behaves_as_an_event_for_one_waiter():
    flag = Flag()
    assert not flag.is_set()
    flag.set()
    flag.set()  # (setting a set flag changes nothing)
    assert flag.is_set()
    flag.wait()  # (returns at once and leaves it set)
    assert flag.is_set()
    flag.clear()
    flag.clear()
    assert not flag.is_set()

    woke = []

    def waiter() -> None:
        flag.take()
        woke.append(flag.is_set())

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    assert woke == [] and t.is_alive()  # (take blocks while the flag is clear)
    flag.set()
    t.join(5)
    assert woke == [False]  # (take clears what it waited for)


@pytest.mark.skipif(len(available_cores()) < 2 or current_cpu() < 0, reason="needs two cores and sched_getcpu")
def test_a_worker_on_the_callers_core_moves_to_a_free_one():
    pool = Pool(2)
    worker_core = pool._core_of[1]
    before = os.sched_getaffinity(0)
    where = []
    try:
        os.sched_setaffinity(0, {worker_core})  # the OS put the caller on worker 1's core
        for _ in range(3):
            pool.run([lambda: where.append(("caller", current_cpu())), lambda: where.append(("worker", current_cpu()))])
        assert pool._core_of[1] != worker_core
        assert os.sched_getaffinity(pool._tid[1]) == {pool._core_of[1]}
        assert all(cpu == worker_core for who, cpu in where if who == "caller")
        assert all(cpu != worker_core for who, cpu in where if who == "worker")
    finally:
        os.sched_setaffinity(0, before)
        pool.close()
