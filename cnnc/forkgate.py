"""Compiles and forks take turns, so a forked child never inherits a compile half done on another thread.

A fork copies only the forking thread. Whatever lock another thread held at
that moment stays held in the child for ever: the import lock of a module it
was importing (the compiler's libraries load on the first compile), the
parallel compile's ``_emitting``, llvmlite's lock around every LLVM call; and
the collector a compile paused stays off. A child that then compiled hung.

So, as numpy and PyTorch do for their own locks, ``os.register_at_fork``
hooks make a fork wait until no other thread is inside a compile (new ones
wait for the fork), and take llvmlite's lock across it (for LLVM work outside
cnnc's compiles). A fork from another thread while a compile runs is delayed
by the rest of that compile, at most; the child starts with no compile in
flight. The parallel compile's own forks (``cnnc.codegen.target``) are made
inside a compile, holding ``_emitting``: they go through as ``internal_fork``,
their children only compile and exit, and the parent's watchdog guards them.
A compile that took or paused anything else a child needs registers how to
set it right with ``on_internal_fork``.
"""

from __future__ import annotations

import logging  # noqa: F401  (loaded with cnnc, not by the first compile: see _install)
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_cond = threading.Condition(threading.Lock())
_active: dict[int, int] = {}  # thread ident -> how many compiles it is inside (a compile may start another)
_internal: set[int] = set()  # threads making one of cnnc's own forks right now
_forking = 0  # ident of the thread waiting to fork (0: none): compiles of other threads wait to start
_held: list[Any] = []  # what the before-fork hook took, released after the fork in the parent
_handlers: dict[int, Any] = {}  # Python's signal handlers, set aside while a fork waits
_caught: list[int] = []  # the signals that came while it waited
_in_hook = False  # the main thread is in the after-fork hook (the signals kept are raised once it is out)
_installed = False  # the fork hooks are registered
_repairs: list[Callable[[], None]] = []  # run in a child forked while another thread made one of cnnc's own forks


@contextmanager
def compiling() -> Iterator[None]:
    """The block is a compile: a fork from another thread waits until it is done."""
    _install()
    me = threading.get_ident()
    with _cond:
        while _forking not in (0, me) and me not in _active:  # (a compile in a compile never waits: the fork
            _cond.wait()                                          # waits for its outer one)
        _active[me] = _active.get(me, 0) + 1
    try:
        yield
    finally:
        with _cond:
            depth = _active.pop(me) - 1
            if depth:
                _active[me] = depth
            _cond.notify_all()


@contextmanager
def internal_fork() -> Iterator[None]:
    """The block forks a child that only compiles and exits (the parallel compile): the hooks let it through.

    Its ``os.fork`` runs every other library's hooks too, and a fork waiting in its hook for this compile may
    hold their locks (logging's): so that fork stops waiting and goes ahead, and its child, where this thread
    held ``_emitting`` and llvmlite's lock but ran no LLVM code, starts them anew (``on_internal_fork``).
    """
    me = threading.get_ident()
    with _cond:
        _internal.add(me)
        _cond.notify_all()
    try:
        yield
    finally:
        with _cond:
            _internal.discard(me)


def on_internal_fork(repair: Callable[[], None]) -> None:
    """Run `repair` in a child forked while another thread was in ``internal_fork`` (see there)."""
    _repairs.append(repair)


def llvm_lock() -> Any:
    """llvmlite's lock around every LLVM call, if llvmlite is loaded (a private attribute: without it, None)."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    lock = getattr(getattr(ffi, "lib", None), "_lock", None)
    return lock if hasattr(lock, "__enter__") and hasattr(lock, "__exit__") else None


def _before() -> None:
    global _forking
    me = threading.get_ident()
    if me in _internal:
        return
    _cond.acquire()
    _forking = me
    if not _internal and any(t != me for t in _active):
        _defer_signals()
        while not _internal and any(t != me for t in _active):
            _cond.wait()
    lock = llvm_lock()  # (held by no compile now, but LLVM may have other users; an internal fork holds it)
    if lock is not None and not _internal:
        lock.__enter__()
        _held.append(lock)


def _defer_signals() -> None:
    """A handler that raised in the fork's wait (Ctrl-C) would end the wait, not the fork: the hook's exception
    is only printed, the fork goes ahead mid-compile and the interrupt is lost. Its signal is kept instead."""
    global _caught
    if threading.current_thread() is not threading.main_thread():  # (only the main thread runs handlers)
        return
    caught = _caught = []  # (a list of this wait's own: the last wait's deliverer may still be reading its list)
    for number in signal.valid_signals():
        handler = signal.getsignal(number)
        if callable(handler):
            _handlers[number] = handler
            signal.signal(number, lambda n, frame: caught.append(n))


def _restore_signals(deliver: bool) -> None:
    """The handlers back; in the parent, the signals kept are raised again, to run once the fork has returned.

    In the parent only the main thread's own fork does it: another thread's fork may go first while the main
    thread's still waits (its handlers must stay set aside), and could not set a handler anyway (a ValueError,
    the recorder left as SIGINT's handler for good). In a child the forking thread is the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    if deliver and _handlers:  # (started while the recorders are still set: a Ctrl-C during the start is kept
        threading.Thread(target=_deliver, args=(_caught,), daemon=True).start()  # too, not raised in the hook)
    while _handlers:
        signal.signal(*_handlers.popitem())


def _deliver(caught: list[int]) -> None:
    """Send `caught` to the main thread once it is out of the hook: raised inside it (``raise_signal`` there), the
    handler's exception would be printed and lost again."""
    while _in_hook:
        time.sleep(0.0005)
    for number in dict.fromkeys(caught):
        signal.pthread_kill(threading.main_thread().ident, number)  # (a real signal wakes a sleep)


def _release() -> None:
    global _forking
    while _held:
        _held.pop().__exit__(None, None, None)
    _forking = 0
    _cond.notify_all()
    _cond.release()


def _after_in_parent() -> None:
    global _in_hook
    if threading.get_ident() not in _internal:
        _in_hook = True
        try:
            _release()
            _restore_signals(deliver=True)
        finally:  # (a signal just after the handlers are back may raise in here: the deliverer must not wait on)
            _in_hook = False


def _after_in_child() -> None:
    """Only this thread exists now: the gate keeps its compiles (none, unless it forked inside one) and no other's."""
    global _cond, _active, _internal
    me = threading.get_ident()
    if me in _internal:
        return
    interrupted = bool(_internal)
    _release()
    _restore_signals(deliver=False)  # (they came to the parent)
    _cond = threading.Condition(threading.Lock())
    _active = {me: _active[me]} if me in _active else {}
    _internal = set()
    if interrupted:
        lock = llvm_lock()
        if lock is not None:
            lock._lock = threading.RLock()  # (the same object: llvmlite's wrappers each keep it)
        for repair in _repairs:
            repair()


def _install() -> None:
    """The hooks, from the first compile on (none runs before it, so a fork has none to wait for).

    A library that registers fork hooks of its own as it is first loaded by a compile is loaded first: were
    its hooks registered after the gate's, its before-fork hook would run first (they run in reverse order) and
    hold its lock while the fork waits for a compile that needs it (logging: a hang); were it loaded while a
    fork waits, its after-fork hook would run without its before-fork one ("cannot release un-acquired lock").
    That library (logging) is loaded with this module, not here: a fork from another thread while the first
    compile imported it, before any hook existed, left the child its import lock held by no thread (the child's
    first compile hung importing it)."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    with _cond:
        if not _installed:
            os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
            _installed = True
