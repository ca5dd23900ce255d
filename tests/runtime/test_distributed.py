"""The MPI communicator: found only under a launcher, its collectives, and a failing rank ending the whole job."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from cnnc_runtime import distributed
from cnnc_runtime.batchnorm import Reducer, combine_moments
from cnnc_runtime.distributed import Local, RankReducer, check_same, fingerprint, launched_rank_size, share
from tests.runtime.mpijob import needs_mpi, run_job


@pytest.mark.parametrize("n", [0, 1, 5, 64, 65])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shares_cover_the_batch_in_order_and_differ_by_at_most_one(n, size):
    parts = [share(n, r, size) for r in range(size)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(parts[r][1] == parts[r + 1][0] for r in range(size - 1))
    lengths = [hi - lo for lo, hi in parts]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, (1, 4)),  # MPICH, Intel MPI
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, (0, 2)),  # Open MPI
    ({"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "8"}, (3, 8)),  # MVAPICH
    ({"PMI_RANK": "0", "PMI_SIZE": "1"}, None),  # mpiexec -n 1: a plain single process
    ({"PMI_RANK": "x", "PMI_SIZE": "2"}, None),
])
def test_an_mpi_job_is_recognised_by_its_launcher_environment(env, expected):
    assert launched_rank_size(env) == expected


def test_without_a_launcher_training_is_one_process_and_mpi4py_is_not_imported(monkeypatch):
    for rank_var, size_var in distributed.LAUNCHER_ENV:
        monkeypatch.delenv(rank_var, raising=False)
        monkeypatch.delenv(size_var, raising=False)
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setattr(distributed, "_connect", lambda rank, size: pytest.fail("tried to join an MPI job"))
    comm = distributed.world()
    assert isinstance(comm, Local) and (comm.rank, comm.size, comm.is_root) == (0, 1, True)
    buf = np.arange(4, dtype=np.float32)
    comm.sum_in_place(buf)
    comm.broadcast(buf)
    np.testing.assert_array_equal(buf, np.arange(4))
    assert comm.broadcast_object({"a": 1}) == {"a": 1} and comm.gather_object(3) == [3]


def test_a_launcher_without_mpi4py_is_an_error_not_n_separate_runs(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setitem(__import__("sys").modules, "mpi4py", None)  # import mpi4py raises ImportError
    with pytest.raises(RuntimeError, match=r"rank 1 of 2.*pip install 'cnnc\[mpi\]'"):
        distributed.world()


def test_a_process_forked_from_a_rank_is_told_it_is_no_rank_not_left_in_its_parents_collectives(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "1")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(distributed, "_world", None)
    monkeypatch.setattr(distributed, "_connect", lambda rank, size: pytest.fail("tried to join an MPI job"))
    pid = os.fork()
    if pid == 0:  # (the parent's world, if it had one, is forgotten by the fork hook)
        try:
            distributed.world()
            os._exit(1)
        except RuntimeError as e:
            os._exit(0 if "forked from rank 1 of an MPI job of 2" in str(e) else 2)
        except BaseException:
            os._exit(3)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_fingerprints_tell_arrays_values_and_bytes_apart():
    a = np.arange(6, dtype=np.float32)
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.reshape(2, 3)) != fingerprint(a.astype(np.float64))
    assert fingerprint({"lr": 0.1}, b"x") != fingerprint({"lr": 0.2}, b"x")
    check_same(Local(), network=fingerprint(a))  # one rank always agrees with itself


@needs_mpi
def test_collectives_across_two_ranks(tmp_path):
    r = run_job(tmp_path, """
        import numpy as np
        from cnnc_runtime.distributed import Mpi, world
        comm = world()
        assert isinstance(comm, Mpi) and comm.size == 2
        grads = np.full(1000, comm.rank + 1.0, np.float32)
        comm.sum_in_place(grads)
        params = np.full(10, float(comm.rank), np.float32)
        comm.broadcast(params)
        seen = [float(grads.min()), float(grads.max()), float(params.max()), comm.broadcast_object(comm.rank),
                comm.gather_object(comm.rank)]
        open(f"rank{comm.rank}.txt", "w").write(repr(seen))
    """)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):  # (ranks' prints may interleave: each writes a file)
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[3.0, 3.0, 0.0, 0, [0, 1]]"


@needs_mpi
def test_ranks_on_one_machine_sum_large_buffers_through_shared_memory_in_rank_order(tmp_path):
    """Three ranks: float32 and float64 buffers of 40,000 values (``nodesum``, shared memory) are summed in rank
    order, ((r0 + r1) + r2), the same bits on every rank; ``sum_buffer``'s own memory is summed in place (no copy
    in or out); a small buffer goes through MPI's all-reduce."""
    r = run_job(tmp_path, """
        import numpy as np
        from cnnc_runtime.distributed import world
        comm = world()
        assert comm.node_sum is not None  # (the ranks share this machine)
        def values(rank, n, dtype):
            return np.random.default_rng(rank).standard_normal(n).astype(dtype) * 10.0 ** (3 * rank)
        seen = []
        for dtype in (np.float32, np.float64):
            buf = values(comm.rank, 40_000, dtype)
            comm.sum_in_place(buf)
            want = (values(0, 40_000, dtype) + values(1, 40_000, dtype)) + values(2, 40_000, dtype)
            seen.append(bool(np.array_equal(buf, want)))
        own = comm.sum_buffer(40_000)
        own[...] = values(comm.rank, 40_000, np.float32)
        comm.sum_in_place(own)
        seen.append(bool(np.array_equal(own, (values(0, 40_000, np.float32) + values(1, 40_000, np.float32))
                                             + values(2, 40_000, np.float32))))
        small = np.full(5, comm.rank + 1.0)
        comm.sum_in_place(small)
        seen.append(small.tolist())
        open(f"rank{comm.rank}.txt", "w").write(repr(seen))
    """, ranks=3)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1, 2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[True, True, True, [6.0, 6.0, 6.0, 6.0, 6.0]]"


@needs_mpi
def test_ranks_on_one_machine_sum_their_parts_for_a_sharded_update_and_share_one_copy(tmp_path):
    """Three ranks, the pieces of a sharded update (``update_slice``): a sharded sum leaves the rank-order sum in
    this rank's part of its own segment (one barrier), ``gather_sum`` collects the whole sum from the ranks'
    parts, ``meet`` adds a few values in rank order (many meets in a row: their values never mix), and a
    ``shared_buffer`` is one copy that every rank sees after a meet. Parts are cut at cache lines and cover the
    buffer; small weights are not sharded."""
    r = run_job(tmp_path, """
        import numpy as np
        from cnnc_runtime import distributed
        from cnnc_runtime.distributed import world
        comm = world()
        n = 300_001
        def values(rank):
            return np.random.default_rng(rank).standard_normal(n).astype(np.float32) * 10.0 ** (3 * rank)
        parts = [comm.node_sum.slice(n, np.float32, r) for r in range(3)]
        assert comm.update_slice(n) == parts[comm.rank] and comm.update_slice(1000) is None
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert all(lo % 16 == 0 for lo, _ in parts)
        want = (values(0) + values(1)) + values(2)
        own = comm.sum_buffer(n)
        own[...] = values(comm.rank)
        extra = np.array([comm.rank + 1.0, 0.5])
        comm.sum_in_place(own, extra, shard=True)
        lo, hi = parts[comm.rank]
        seen = [bool(np.array_equal(own[lo:hi], want[lo:hi])), extra.tolist()]
        whole = np.zeros(n, np.float32)
        comm.gather_sum(whole)
        seen.append(bool(np.array_equal(whole, want)))
        meets = []
        for i in range(50):
            v = np.array([float(comm.rank + i), 1.0])
            comm.meet(v)
            meets.append(v.tolist() == [3.0 * i + 3.0, 3.0])
        seen.append(all(meets))
        one = comm.shared_buffer("test", n)
        one[lo:hi] = comm.rank
        comm.meet()
        seen.append(one[::1000].tolist() == [float(r) for r in np.searchsorted([p[1] for p in parts],
                                                                                 np.arange(0, n, 1000), "right")])
        comm.meet()  # (no rank leaves, unmapping, while a peer reads)
        open(f"rank{comm.rank}.txt", "w").write(repr(seen))
    """, ranks=3)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1, 2):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "[True, [6.0, 1.5], True, True, True]"


@needs_mpi
def test_a_few_float64_values_ride_along_with_a_sum_in_the_same_collective(tmp_path):
    """``extra`` (a step's verdict, loss and counts) is summed with the buffer, in rank order on every rank: with a
    large buffer in shared memory (no second collective: the values sit in a cache line after each segment), and
    with a small one, or more values than that line holds, through MPI's all-reduce."""
    r = run_job(tmp_path, """
        import numpy as np
        from cnnc_runtime.distributed import world
        from cnnc_runtime.nodesum import EXTRA
        comm = world()
        shared = comm.sum_buffer(40_000)  # (the window is made before its communicator is wrapped below)
        calls = []

        class Counted:  # (a communicator whose collectives are counted: mpi4py's methods cannot be patched)
            def __init__(self, comm):
                self.comm = comm

            def __getattr__(self, name):
                calls.append(name)
                return getattr(self.comm, name)

        comm.node_sum._node, comm._comm = Counted(comm.node_sum._node), Counted(comm._comm)
        barrier = comm.node_sum._barrier
        comm.node_sum._barrier = lambda win: (calls.append("own barrier"), barrier(win))
        def extra(rank, k):
            return np.arange(k) + 0.1 * 10.0 ** rank
        seen = []
        for n, k in ((40_000, 5), (40_000, EXTRA), (10, 3), (40_000, EXTRA + 1)):
            own = shared if n >= 40_000 else np.zeros(n, np.float32)
            own[...] = comm.rank + 1.0
            values = extra(comm.rank, k)
            before = len(calls)
            comm.sum_in_place(own, values)
            want = (extra(0, k) + extra(1, k)) + extra(2, k)
            seen.append((bool(np.array_equal(values, want)), float(own.min()), float(own.max()), calls[before:]))
        open(f"rank{comm.rank}.txt", "w").write(repr(seen))
    """, ranks=3)
    assert r.returncode == 0, r.stderr
    shared, small = "'own barrier', 'own barrier'", "'Allreduce', 'Allreduce'"
    more = f"{shared}, 'Allreduce'"
    for rank in (0, 1, 2):  # (the shared-memory sum: its own two barriers, no MPI call; else an all-reduce each)
        assert (tmp_path / f"rank{rank}.txt").read_text() == \
            f"[(True, 6.0, 6.0, [{shared}]), (True, 6.0, 6.0, [{shared}]), (True, 6.0, 6.0, [{small}]), " \
            f"(True, 6.0, 6.0, [{more}])]"


@needs_mpi
def test_ranks_that_differ_are_told_which_and_in_what(tmp_path):
    r = run_job(tmp_path, """
        from cnnc_runtime.distributed import check_same, world
        comm = world()
        try:
            check_same(comm, network="same", data=f"file of rank {comm.rank}")
        except ValueError as e:
            open(f"rank{comm.rank}.txt", "w").write(str(e))
    """)
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):  # every rank raises the same error
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(
            "the ranks of this MPI job differ in their data: rank 1 disagrees with rank 0")


@needs_mpi
def test_a_failing_rank_ends_the_whole_job_with_its_message(tmp_path):
    t0 = time.monotonic()
    r = run_job(tmp_path, """
        import numpy as np
        from cnnc_runtime.distributed import abort_on_failure, world
        comm = world()
        buf = np.zeros(10, np.float32)
        try:
            if comm.rank == 1:
                raise ValueError("rank 1 cannot read its data")
            comm.sum_in_place(buf)  # rank 0 waits here for a peer that will never come
        except BaseException as e:
            abort_on_failure(comm, e)
            raise
    """, timeout=60)
    assert r.returncode != 0
    assert "rank 1 of 2: failed, ending the job: ValueError: rank 1 cannot read its data" in r.stderr
    assert time.monotonic() - t0 < 30


def test_the_launcher_of_this_pythons_mpi_wheel_comes_first(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "mpiexec").write_text("")
    monkeypatch.setattr(distributed.sys, "executable", str(tmp_path / "bin" / "python"))
    assert distributed.mpiexec_path() == str(tmp_path / "bin" / "mpiexec")


class Gathered(Local):
    """Rank `rank` of a pretend job whose peers' contributions are known: an allgather returns them, this rank's
    own in its place."""

    def __init__(self, rank: int, peers: list) -> None:
        self.rank, self.size, self.peers = rank, len(peers), peers

    def gather_object(self, obj):
        return [obj if r == self.rank else p for r, p in enumerate(self.peers)]


def _shard_parts(values: np.ndarray, cuts: list[int]):
    """(counts, sums, m2s) of the shards values[cuts[i]:cuts[i+1]], as a step's shards give them."""
    shards = [values[a:b] for a, b in zip(cuts, cuts[1:])]
    return ([float(len(s)) for s in shards], [s.sum(axis=0) for s in shards],
            [((s - s.mean(axis=0)) ** 2).sum(axis=0) for s in shards])


def test_rank_reducer_gives_every_rank_the_whole_batchs_statistics_in_identical_bits():
    """Three ranks with 7, 13 and 10 values per channel (in 2, 3 and 1 shards), offset by 100: every rank gets
    the mean and sum of squared deviations of all 30, and the same bits as every other rank."""
    values = 100.0 + np.random.default_rng(0).standard_normal((30, 3))
    ranks = [values[:7], values[7:20], values[20:]]
    cuts = [[0, 3, 7], [0, 4, 9, 13], [0, 10]]
    local = [_shard_parts(v, c) for v, c in zip(ranks, cuts)]
    moments_peers = [Reducer().moments(*p) for p in local]
    sums_peers = [Reducer().sums(p[1]) for p in local]
    results = [(RankReducer(Gathered(r, moments_peers)).moments(*local[r]),
                RankReducer(Gathered(r, sums_peers)).sums(local[r][1])) for r in range(3)]
    for (n, mean, m2), total in results:
        assert n == 30
        np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(m2, ((values - values.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-10)
        np.testing.assert_allclose(total, values.sum(axis=0), rtol=1e-14)
        for mine, rank0 in zip((mean, m2, total), (results[0][0][1], results[0][0][2], results[0][1])):
            np.testing.assert_array_equal(mine, rank0)


def test_combining_moments_skips_empty_parts():
    mean, m2 = np.array([2.0]), np.array([8.0])
    n, got_mean, got_m2 = combine_moments([0.0, 4.0, 0.0], [np.zeros(1), mean, np.zeros(1)],
                                          [np.zeros(1), m2, np.zeros(1)])
    assert (n, got_mean.tolist(), got_m2.tolist()) == (4.0, [2.0], [8.0])
