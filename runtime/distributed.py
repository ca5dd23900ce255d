"""Data-parallel training over MPI: which process of a job this is, and the few collectives a step needs.

A process is one rank of an MPI job only when ``mpiexec`` (or ``srun`` with
PMI) started it: its environment names a rank and a size of two or more.
Only then is mpi4py imported, so without an MPI launcher nothing changes and
mpi4py need not be installed (``pip install 'cnnc[mpi]'`` brings it and an
MPI library).

Every rank holds the whole model. A step's batch is shared out between the
ranks, each computes the gradient of its images scaled by the *global*
image count, and one in-place all-reduce (a sum) of the flat gradient buffer
gives every rank the mean over the whole batch; each then takes the same
optimizer step, so the replicas never drift apart. Ranks that share a
machine sum large buffers through shared memory (``cnnc_runtime.nodesum``). Batchnorm's batch
statistics and backward sums are reduced across the ranks too
(``RankReducer``), so every rank normalizes with the whole batch's.

MPI has no recovery from a rank that stops taking part: its peers wait in
their next collective forever. So a rank that fails calls ``abort``, which
prints its message and ends every rank of the job with a non-zero status.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cnnc_runtime.batchnorm import Reducer, combine_moments
from cnnc_runtime.nodesum import EXTRA, MIN_BYTES, NodeSum

# a sharded update (``Local.update_slice``) for weights of at least this many bytes: it saves each rank the update
# of the other ranks' parts but costs two more meetings a step (a callback and a barrier each, and a wait for a
# descheduled peer on a busy machine), which LeNet-5's 61k weights do not pay back (measured: 17% more CPU, 2 ranks)
SHARDED_MIN_BYTES = 1 << 20

# (rank, size) variables set by launchers: MPICH's and Intel MPI's hydra (PMI), Open MPI, MVAPICH
LAUNCHER_ENV = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))


def launched_rank_size(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, size) when a launcher started this process as one of several ranks, else None."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in LAUNCHER_ENV:
        rank, size = env.get(rank_var, ""), env.get(size_var, "")
        if rank.isdigit() and size.isdigit() and int(size) > 1:
            return int(rank), int(size)
    return None


def mpiexec_path() -> str | None:
    """The ``mpiexec`` of this Python's MPI wheel (beside the interpreter, or in its scripts folders), else the
    one on PATH, else None: the wheel's launcher goes with the libmpi mpi4py loads."""
    folders = [Path(sys.executable).parent] + [Path(sysconfig.get_path("scripts", scheme))
                                               for scheme in (sysconfig.get_default_scheme(), f"{os.name}_user")
                                               if scheme in sysconfig.get_scheme_names()]
    for folder in folders:
        if (folder / "mpiexec").is_file():
            return str(folder / "mpiexec")
    return shutil.which("mpiexec")


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous part [lo, hi) of n images: sizes differ by at most one, the larger ones first."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class Local:
    """The one process of a run that is not an MPI job: every collective is the identity."""

    rank = 0
    size = 1
    is_root = True

    def broadcast(self, buf: np.ndarray) -> None:
        """Every rank's `buf` becomes rank 0's (in place)."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (any picklable value) on every rank."""
        return obj

    def sum_in_place(self, buf: np.ndarray, extra: np.ndarray | None = None, shard: bool = False) -> None:
        """`buf` becomes the sum of every rank's `buf` (in place), and so does `extra` (a few float64 values: a
        step's verdict and counts), in the same collective where the ranks share a machine. With `shard`, only
        this rank's ``update_slice`` of `buf` must be summed."""

    def sum_buffer(self, count: int) -> np.ndarray | None:
        """`count` float32 values that ``sum_in_place`` sums fastest (without copies), or None: any buffer will
        do. (A collective call.)"""
        return None

    def update_slice(self, count: int) -> tuple[int, int] | None:
        """This rank's part [lo, hi) of `count` float32 weights when the ranks can update the weights sharded
        (each its part, of one copy in memory they share: ``shared_buffer``), else None. Then ``sum_in_place(buf,
        extra, shard=True)`` of the ``sum_buffer`` sums only that part, ``meet`` orders the rest of a step, and
        ``gather_sum`` collects the whole sum."""
        return None

    def shared_buffer(self, name: str, count: int) -> np.ndarray:
        """`count` float32 values that every rank maps, one copy (where ``update_slice`` is not None), by `name`.
        (A collective call, once per name and size.)"""
        raise RuntimeError("no memory shared between ranks here (update_slice is None)")

    def meet(self, values: np.ndarray | None = None) -> None:
        """Wait until every rank has come here; `values` (a few float64) become the sum of every rank's."""

    def gather_sum(self, buf: np.ndarray) -> None:
        """After a sharded ``sum_in_place`` into the ``sum_buffer`` (before any rank writes it again): the whole
        sum into `buf`. (A collective call.)"""

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        """Wait until every rank has come here."""


class Mpi(Local):
    """One rank of an MPI job (mpi4py's COMM_WORLD)."""

    def __init__(self, comm: Any, mpi: Any) -> None:
        self._comm, self._mpi = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        # ranks all on one machine sum large buffers through shared memory (None: by MPI's all-reduce)
        node = NodeSum(comm, mpi)
        self.node_sum: NodeSum | None = node if node.usable else None

    def broadcast(self, buf: np.ndarray) -> None:
        self._comm.Bcast(buf, root=0)

    def broadcast_object(self, obj: Any) -> Any:
        return self._comm.bcast(obj, root=0)

    def sum_in_place(self, buf: np.ndarray, extra: np.ndarray | None = None, shard: bool = False) -> None:
        riding = extra is not None and extra.size <= EXTRA and extra.dtype == np.float64 and extra.flags.c_contiguous
        if shard and not riding:
            raise ValueError(f"a sharded sum takes at most {EXTRA} contiguous float64 values along")
        if (self.node_sum is not None and buf.nbytes >= MIN_BYTES and buf.dtype in (np.float32, np.float64)
                and buf.flags.c_contiguous):
            self.node_sum.sum_in_place(buf, extra if riding else None, shard)
        elif shard:
            raise ValueError("a sharded sum needs the ranks on one machine and a buffer of at least "
                             f"{MIN_BYTES} bytes (update_slice says when)")
        else:
            self._comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
            riding = False
        if extra is not None and not riding:
            self._comm.Allreduce(self._mpi.IN_PLACE, extra, op=self._mpi.SUM)

    def sum_buffer(self, count: int) -> np.ndarray | None:
        return self.node_sum.segment(count, np.float32) if self.node_sum is not None else None

    def update_slice(self, count: int) -> tuple[int, int] | None:
        if self.node_sum is None or 4 * count < max(MIN_BYTES, SHARDED_MIN_BYTES):
            return None
        return self.node_sum.slice(count, np.float32)

    def shared_buffer(self, name: str, count: int) -> np.ndarray:
        if self.node_sum is None:
            return super().shared_buffer(name, count)
        return self.node_sum.shared(name, count, np.float32)

    def meet(self, values: np.ndarray | None = None) -> None:
        if self.node_sum is not None:
            self.node_sum.meet(values)
            return
        if values is None:
            self._comm.Barrier()
        else:
            self._comm.Allreduce(self._mpi.IN_PLACE, values, op=self._mpi.SUM)

    def gather_sum(self, buf: np.ndarray) -> None:
        if self.node_sum is None:
            raise RuntimeError("no sharded sum here (update_slice is None)")
        self.node_sum.gather_sum(buf)

    def gather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, message: str, status: int = 1) -> None:
        """Print `message` (tagged with this rank) and end every rank of the job with `status`: none is left
        waiting in a collective."""
        print(f"rank {self.rank} of {self.size}: {message}", file=sys.stderr, flush=True)
        # the launcher forwards output asynchronously and stops forwarding at the abort: give the message time to
        # leave (seen lost under load), and when every rank fails at once let rank 0's arrive first
        time.sleep(0.3 if self.rank else 0.1)
        self._comm.Abort(status)


_world: Local | None = None


def world() -> Local:
    """This process's place in a data-parallel run: an ``Mpi`` rank under an MPI launcher, else ``Local``.

    mpi4py is imported here, and only under a launcher. A launcher without mpi4py is an error: the ranks
    would otherwise each train alone and write the same files.
    """
    global _world
    if _world is None:
        launched = launched_rank_size()
        if launched is not None and _forked_from != os.getpid():
            raise RuntimeError(f"this process was forked from rank {launched[0]} of an MPI job of {launched[1]}: "
                               f"only the launched ranks take part in the job (train in the rank itself, or run "
                               f"the child without the launcher's environment)")
        if launched is None:
            _world = Local()
        else:
            _world = _connect(*launched)
    return _world


_forked_from = os.getpid()  # the process this module was loaded in: its forked children are no MPI ranks


def _forget_world_after_fork() -> None:
    """MPI does not survive a fork (the child would join its parent's collectives): the child has no world."""
    global _world
    _world = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_world_after_fork)


def _connect(rank: int, size: int) -> Mpi:
    try:
        from mpi4py import MPI  # an optional dependency (the mpi extra), needed only in an MPI job
    except ImportError as e:
        raise RuntimeError(f"this process was started by an MPI launcher as rank {rank} of {size}, but mpi4py "
                           f"cannot be imported ({e}): pip install 'cnnc[mpi]'") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:
        raise RuntimeError(f"the launcher says {size} ranks but MPI sees {comm.Get_size()}: mpi4py is linked "
                           f"to another MPI than the one of mpiexec (install both into the same prefix)")
    return Mpi(comm, MPI)


def abort_on_failure(comm: Local, exc: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """In an MPI job, end the whole job over `exc`, its message printed; else do nothing.

    For exceptions that not every rank may share: one rank's bad file, a bug, a kill by Ctrl-C that reached
    one rank only. Its peers would wait for it in their next collective forever. A bug (anything but a
    ValueError, OSError, KeyboardInterrupt or one of `user_errors`) gets its traceback printed too.
    """
    if isinstance(comm, Mpi):
        if isinstance(exc, (ValueError, OSError, KeyboardInterrupt, *user_errors)):
            detail = f"{type(exc).__name__}: {exc}".rstrip()
        else:
            detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip()
        comm.abort(f"failed, ending the job: {detail}")


def fingerprint(*parts: Any) -> str:
    """A short digest of arrays, bytes and JSON-able values, to compare ranks' inputs without sending them."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype.str}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:16]


def check_same(comm: Local, **digests: str) -> None:
    """ValueError naming what differs when the ranks' `digests` (name -> fingerprint) are not all rank 0's.

    Every rank takes part and every rank raises the same error, so the job ends cleanly.
    """
    everyone = comm.gather_object(digests)
    for name, mine in everyone[0].items():
        odd = [r for r, d in enumerate(everyone) if d.get(name) != mine]
        if odd:
            raise ValueError(f"the ranks of this MPI job differ in their {name}: rank{'s' * (len(odd) > 1)} "
                             f"{', '.join(map(str, odd))} disagree{'s' * (len(odd) == 1)} with rank 0 (give every "
                             f"rank the same files, settings and cnnc)")


class RankReducer(Reducer):
    """Batchnorm's reductions across the ranks of a job (``Statistics.reducer``): each rank's step sees the
    statistics of the whole global batch, as one process would.

    Each rank reduces its own shards, then every rank gathers the per-rank results and combines them in rank
    order, so every rank computes identical bits.
    """

    spans_whole_batch = True

    def __init__(self, comm: Local) -> None:
        self.comm = comm

    def moments(self, counts: Sequence[float], sums: Sequence[np.ndarray],
                m2s: Sequence[np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
        mine = super().moments(counts, sums, m2s)
        ranks = self.comm.gather_object(mine)
        return combine_moments(*zip(*ranks))

    def sums(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        ranks = self.comm.gather_object(super().sums(parts))
        return Reducer.sums(self, ranks)
