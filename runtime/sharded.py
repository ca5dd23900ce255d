"""The weights of a sharded update: one copy that the ranks on one machine share, each rank updating its part.

Every rank of a data-parallel job holds the whole model, and without this
each would repeat the same optimizer step over all the weights after the
gradient's sum (the decay, the finite checks, the copy kept to undo a step,
the update: reading and writing every weight and the optimizer's state:
1.5 ms of CPU of a rank's ~34 ms step of the CIFAR-style net, measured on a
loaded machine). With the ranks on one machine
(``Local.update_slice``), a native run (``cnnc_runtime.steploop``) instead
runs on weights, a snapshot and optimizer state in shared memory, and each
rank checks and updates only its part, after summing only that part of the
gradient: the same elementwise operations on the same values, so the same
bits, once per machine instead of once per rank.

Python code between runs (the epoch's end, a checkpoint, a stop, the
per-step path) reads and writes the model's own arrays, so the shared copy
is loaded from them when a run starts (``attach``: each rank copies its
part) and written back before Python uses them again (``detach``: every
rank copies it all); both are collective, called by every rank at the same
point of the training loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NAMES = ("params", "good", "s1", "s2")  # the ctx fields the shared buffers stand in for (steploop.FIELDS)


class SharedWeights:
    """The shared copies of the buffers a native run updates, and which of the model's arrays they stand for."""

    def __init__(self, comm: Any, count: int, lo: int, hi: int) -> None:
        self.comm, self.lo, self.hi = comm, lo, hi
        self.buffers = {name: comm.shared_buffer(name, count) for name in NAMES}  # (collective: made once, kept)
        self._private: dict[str, np.ndarray] | None = None  # the arrays the shared copies now stand for

    @property
    def attached(self) -> bool:
        return self._private is not None

    def attach(self, private: dict[str, np.ndarray]) -> dict[str, int]:
        """The shared copies' addresses for the ctx, by name, standing for `private` (a name of ``NAMES`` -> the
        model's array of the same values on every rank): copied in by parts (a collective call), unless they
        already stand for these very arrays."""
        if self._private is not None and all(self._private.get(k) is a for k, a in private.items()) \
                and len(self._private) == len(private):
            return self._addresses()
        self.detach()
        lo, hi = self.lo, self.hi
        for name, array in private.items():
            np.copyto(self.buffers[name][lo:hi], array.reshape(-1)[lo:hi])
        self.comm.meet()  # (every part is in before any rank reads)
        self._private = dict(private)
        return self._addresses()

    def _addresses(self) -> dict[str, int]:
        return {name: self.buffers[name].ctypes.data for name in self._private}

    def detach(self) -> None:
        """The shared copies back into the model's arrays, on every rank (a collective call; nothing when not
        attached)."""
        if self._private is None:
            return
        for name, array in self._private.items():
            np.copyto(array.reshape(-1), self.buffers[name])
        self._private = None
        self.comm.meet()  # (no rank attaches, writing its part, before every rank has read it all)


__all__ = ["NAMES", "SharedWeights"]
