"""A persistent pool of worker threads, each pinned to its own core, for splitting a batch.

Native entry points take a batch range ``[n0, n1)`` and ctypes releases the
GIL while they run, so threads give real parallelism. Threads the OS may move
were seen sharing one core; pinning each worker with ``os.sched_setaffinity``
keeps them apart. The calling thread does the first share itself and is left
unpinned (it is the user's thread); worker ``i`` is pinned to the ``i``-th core
until the caller is seen on that core, when it moves to a core no thread of the
pool holds (``Pool.keep_apart``).
"""

from __future__ import annotations

import _thread
import ctypes
import operator
import os
import threading
import time
from collections.abc import Callable

import numpy as np

from cnnc_runtime.signals import signals_deferred

HANDOFF_INT64S, HANDOFF_STOP = 48, 24  # the native server's control block (cnnc.codegen.handoff: INT64S, STOP)


def available_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


THREADS_PER_CORE = 4  # the most threads a pool may have per core: more only adds switching


def max_threads() -> int:
    """The largest thread count accepted (``THREADS_PER_CORE`` per core this process may run on)."""
    return THREADS_PER_CORE * len(available_cores())


def check_threads(value: object, source: str = "threads") -> int:
    """`value` as a thread count (an int from 1 to ``max_threads()``), else ``ValueError`` naming `source`."""
    top = max_threads()
    expected = f"{source} must be a whole number of threads from 1 to {top} ({THREADS_PER_CORE} per core)"
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{expected}, got {value!r}"[:300]) from None
    if not 1 <= n <= top:
        raise ValueError(f"{expected}, got {n}"[:300])
    return n


def default_threads() -> int:
    """``CNNC_THREADS`` if set (``ValueError`` unless it is a count from 1 to ``max_threads()``), else every core
    this process may run on."""
    env = os.environ.get("CNNC_THREADS", "").strip()
    if not env:
        return len(available_cores())
    try:
        value: object = int(env)
    except ValueError:  # (also a number of more than 4300 digits)
        value = env
    return check_threads(value, "CNNC_THREADS")


def _cpu_reader() -> Callable[[], int]:
    """libc's ``sched_getcpu`` (about 0.1 us a call through ctypes), or a function returning -1 where there is none."""
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return lambda: -1
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


current_cpu = _cpu_reader()


def split(n: int, parts: int, grain: int = 1) -> list[tuple[int, int]]:
    """[0, n) cut into at most `parts` contiguous ranges of whole `grain`s, as even as possible."""
    parts = max(1, min(parts, -(-n // grain)))
    bounds = [round(i * n / parts / grain) * grain for i in range(parts)] + [n]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


class Flag:
    """``threading.Event``'s set/clear/is_set/wait on one raw lock, which is held while the flag is clear.

    A pool call sets and waits two flags per worker right after long native shares, when the interpreter's code is
    out of the caches and each Python step costs 5-20x its warm price: an Event's Condition makes each set or wait
    some ten Python calls and a second lock; here each is one or two lock operations. For the pool's protocol:
    one thread waits, and a flag is set only while clear (no two sets race)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def set(self) -> None:
        if self._lock.locked():
            self._lock.release()

    def clear(self) -> None:
        self._lock.acquire(False)

    def wait(self) -> None:
        with self._lock:  # (given back at once: the flag stays set)
            pass

    def take(self) -> None:
        """Wait until set, and clear."""
        self._lock.acquire()


class Pool:
    """``run(tasks)`` calls each task (a no-argument callable) on its own thread and waits for all."""

    def __init__(self, threads: int | None = None) -> None:
        self.size = default_threads() if threads is None else check_threads(threads)
        cores = available_cores()
        self._pin = len(cores) >= self.size > 1
        self._cores = cores
        self._core_of = {i: cores[i] for i in range(1, self.size)} if self._pin else {}  # worker -> its core
        self._tid: dict[int, int] = {}  # worker -> its thread's id (for moving it)
        self._tasks: list[Callable[[], None] | None] = [None] * self.size
        self._errors: list[BaseException | None] = [None] * self.size
        self._start = [Flag() for _ in range(self.size)]
        self._done = [Flag() for _ in range(self.size)]
        self._closed = False
        self._lock = threading.Lock()  # one batch at a time: callers on several threads take turns
        # a native server on worker 1 (``run_served``): its control block, the code it runs, whether it was started
        # since worker 1 last finished a task, and the number of the last call posted to it
        raw = np.zeros(HANDOFF_INT64S + 8, dtype=np.int64)
        self.handoff = raw[(-raw.ctypes.data % 64) // 8:][:HANDOFF_INT64S]
        self._server_key: object = None
        self._served = False
        self._seq = 0
        self._threads = []
        for i in range(1, self.size):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"cnnc-worker-{i}")
            t.start()
            self._threads.append(t)
            self._tid[i] = t.native_id
            if self._pin:  # (from here, not by the worker itself: a keep_apart may move it before it runs)
                try:
                    os.sched_setaffinity(t.native_id, {cores[i]})
                except (OSError, AttributeError, TypeError):  # (not Linux: no affinity, or no thread id)
                    self._core_of.pop(i)

    def _worker(self, i: int) -> None:
        while True:
            self._start[i].take()
            if self._closed:
                return
            try:
                self._tasks[i]()
            except BaseException as e:  # re-raised on the calling thread
                self._errors[i] = e
            self._done[i].set()

    def keep_apart(self) -> None:
        """Move the worker pinned to the calling thread's core (if one is) to a core no thread of the pool holds.

        The caller is left free, and the OS was seen to run it on worker 1's core for
        seconds on end while the other core idled: every shared ResNet-20 image then
        took 670 us on one core, against 263 on two (392 on one thread alone). One
        ``sched_getcpu`` a call finds it; a move is one system call."""
        if not self._core_of:
            return
        here = current_cpu()
        for i, core in self._core_of.items():
            if core == here:
                held = set(self._core_of.values()) | {here}
                free = [c for c in self._cores if c not in held]
                if free:
                    try:
                        os.sched_setaffinity(self._tid[i], {free[0]})
                        self._core_of[i] = free[0]
                    except (OSError, AttributeError, TypeError):  # (no longer ours to set: leave it)
                        self._core_of.pop(i)
                return

    def run(self, tasks: list[Callable[[], None]]) -> None:
        if len(tasks) > self.size:
            raise ValueError(f"{len(tasks)} tasks for a pool of {self.size} threads")
        with self._lock, signals_deferred():
            self._stop_server()
            self.keep_apart()
            self._run(tasks)

    def run_served(self, key: object, call: Callable[[int, int], int], serve: Callable[[int], None]) -> float:
        """A call shared with worker 1 through native code (``cnnc.codegen.handoff``): ``call(block, seq)`` posts
        call `seq` to a waiting server, runs the caller's share and waits for the server's (1), or does nothing
        when no server waits (0); ``serve(block)`` is the server worker 1 runs, started here when none waits.
        Returns the seconds spent waiting for a server to start (0.0 when one was waiting).

        Between ``call``'s attempts nothing is posted, so an interrupt anywhere here leaves no server waiting at a
        barrier for a share that will not come."""
        block = self.handoff.ctypes.data
        with self._lock:
            if self._server_key is not key:  # (a server of other code: it would run the wrong function)
                self._stop_server()
            self.keep_apart()
            self._seq += 1
            begin = tried = 0.0
            while not call(block, self._seq):
                begin = begin or time.perf_counter()
                if not self._served or self._done[1].is_set():  # no server, or the last left (idle): start one
                    self._tasks[1], self._errors[1] = (lambda: serve(block)), None
                    self._server_key, self._served = key, True
                    self.handoff[HANDOFF_STOP] = 0  # (none runs now; a stop cut short by Ctrl-C left it set)
                    try:
                        self._done[1].clear()
                    finally:  # (set even when interrupted: a cleared `done` with no task behind it never comes)
                        self._start[1].set()
                else:  # (a server starting, or leaving through Python)
                    time.sleep(0)
                tried = time.perf_counter()  # (the attempt that succeeds follows)
            return tried - begin

    def _stop_server(self) -> None:
        """Worker 1 back from its native server (told to stop), before it takes another task."""
        if not self._served:
            return
        self.handoff[HANDOFF_STOP] = 1
        self._done[1].wait()
        self.handoff[HANDOFF_STOP] = 0
        self._served, self._server_key = False, None
        if self._errors[1] is not None:
            raise self._errors[1]

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        for i, task in enumerate(tasks[1:], start=1):
            self._tasks[i] = task
            self._errors[i] = None
            self._done[i].clear()
            self._start[i].set()
        try:
            if tasks:
                tasks[0]()
        finally:  # even when the caller's share raised: never leave a worker running on shared buffers
            for i in range(1, len(tasks)):
                self._done[i].wait()
        for i in range(1, len(tasks)):
            if self._errors[i] is not None:
                raise self._errors[i]

    def close(self) -> None:
        self._closed = True
        self.handoff[HANDOFF_STOP] = 1
        for e in self._start[1:]:
            e.set()


_shared: dict[int, Pool] = {}
_shared_lock = threading.Lock()


def shared_pool(threads: int) -> Pool:
    """The process's pool of `threads` threads: every model uses it, so threads are not made per model.

    Look it up for each batch rather than keeping it: a forked child gets new pools.
    """
    with _shared_lock:
        pool = _shared.get(threads)
        if pool is None:
            pool = _shared[threads] = Pool(threads)
        return pool


def _forget_pools() -> None:
    """In a forked child: only the forking thread exists, so the parent's pools (and a lock held by another
    thread at the fork) are useless there; pools are made again when first needed."""
    global _shared_lock
    _shared_lock = threading.Lock()
    _shared.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
