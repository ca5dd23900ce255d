"""A one-line live progress bar for training epochs, with no dependencies.

It redraws in place with a carriage return, at most about ten times a second,
and only on a terminal: in logs and pipes it stays silent, since the trainer
prints one summary line per epoch anyway.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

BAR_WIDTH = 24


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """m:ss (minutes unbounded), or --:-- when unknown."""
    if not seconds >= 0 or seconds == float("inf"):
        return "--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class ProgressBar:
    """`done/total [####----] loss 0.1234  acc 97.1%  lr 0.001  5,321 img/s  ETA 0:42` on one line.

    enabled=None draws only when `stream` is a TTY. The time left is
    (total - done) batches at the average batch rate since the bar was created.
    """

    def __init__(
        self,
        total_batches: int,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval: float = 0.1,
    ) -> None:
        self.total = max(int(total_batches), 0)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _is_tty(self.stream) if enabled is None else bool(enabled)
        self.min_interval = min_interval
        self._start = time.monotonic()
        self._last_draw = -float("inf")
        self._width = 0

    def line(self, done: int, loss: float, accuracy: float | None, images_per_second: float,
             lr: float | None = None) -> str:
        """The text of the bar (no carriage return); accuracy is a fraction in [0, 1]; lr the current rate."""
        total = self.total
        frac = min(done / total, 1.0) if total else 1.0
        filled = int(frac * BAR_WIDTH)
        elapsed = time.monotonic() - self._start
        remaining = (total - done) * elapsed / done if done > 0 else float("nan")
        acc = "   -  " if accuracy is None else f"{100 * accuracy:5.1f}%"
        return (
            f"{done:>{len(str(total))}}/{total} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] "
            f"loss {loss:.4f}  acc {acc}  {'' if lr is None else f'lr {lr:.3g}  '}"
            f"{images_per_second:,.0f} img/s  ETA {format_duration(remaining)}"
        )

    def update(self, n_batches_done: int, loss: float, accuracy: float | None, images_per_second: float,
               lr: float | None = None) -> None:
        """Redraw after `n_batches_done` batches, unless the last redraw was under min_interval ago.

        The final batch (done == total) is always drawn.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < self.min_interval and n_batches_done < self.total:
            return
        self._last_draw = now
        text = self.line(n_batches_done, loss, accuracy, images_per_second, lr)
        # Pad with spaces to wipe the tail of a longer previous line.
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def close(self) -> None:
        """Erase the bar so the caller's epoch summary takes its line."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        self._width = 0

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
