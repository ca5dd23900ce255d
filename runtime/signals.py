"""Signal handlers held back while a block runs that an exception must not cut in two: the pool's calls
(``cnnc_runtime.parallel``) and the lazy imports of a compile or a load (``cnnc``).

Numpy-free, so that the compiler (``cnnc``) can use it around its lazy imports too: a Ctrl-C in the middle of
importing numpy or networkx leaves the package half loaded in the process for good.
"""

from __future__ import annotations

import _signal  # signal's C module: getsignal/signal without signal's enum conversions (3-5 us a call each)
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Python's handlers of SIGINT and SIGTERM run after the block rather than inside it (on the main thread).

    The pool's tasks may be native code whose threads meet at barriers (a run of steps, a step with batchnorm):
    an exception raised by a handler on the calling thread before its share's native call, or while it waits for
    the workers, leaves a worker spinning at a barrier for ever, and the next call's barrier with it (a second
    Ctrl-C during ``fit`` hung ResNet-20's training). A signal's exception is raised when every thread is back."""
    if threading.current_thread() is not threading.main_thread():  # (only the main thread runs handlers)
        yield
        return
    caught: list[tuple[int, object]] = []
    old: dict[int, Callable[..., object]] = {}
    try:
        for number in DEFERRED_SIGNALS:
            handler = _signal.getsignal(number)
            if callable(handler):  # (SIG_DFL, SIG_IGN and C handlers run no Python code)
                old[number] = handler
                _signal.signal(number, lambda n, frame: caught.append((n, frame)))
        yield
    finally:
        for number, handler in old.items():
            _signal.signal(number, handler)
        for number, frame in caught:
            old[number](number, frame)


__all__ = ["DEFERRED_SIGNALS", "signals_deferred"]
