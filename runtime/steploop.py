"""A run of training steps in one native call per thread: no Python between the steps of a run.

``fit`` hands a run of steps (up to the next point where Python must act: the
end of an epoch, a progress-bar update, the step limit, a possible Ctrl-C) to
the network's ``run_LOSS(ctx, thread)`` entry (``cnnc.codegen.runloop``),
which every pool thread calls once. For each step it gathers the batch from
the stored set by the permutation, crops, flips and jitters it, runs the
training step on each thread's shards, then, after a barrier, each thread
sums its slice of the shards' gradients in shard order, adds the L2 decay's
gradient, checks that slice for NaN and infinity, keeps the weights before
the update and runs the optimizer's native update on that slice; barriers
keep the threads in step. Each operation is the per-step path's own kernel
(or its elementwise numpy form, in the same float32 order), so the weights
are the same bits either way, on any number of threads.

``ctx`` is one int64 array, fields in ``FIELDS`` order (addresses, counts,
float32 values as their bits); the compiler reads this layout, so it is part
of the artifact format. ``unsupported`` is the one place that says which
training setups keep the per-step path.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cnnc_runtime.parallel import shared_pool, split
from cnnc_runtime.sharded import SharedWeights

FIELDS = (
    "steps", "batch", "threads", "shards", "shard_ranges", "thread_shards", "thread_params",
    "params", "grads", "grad_bytes", "arena", "x", "ws",
    "byte", "src", "rows", "geometry", "norm",
    "targets", "target_bytes", "out", "outputs", "losses", "seeds",
    "pad", "flip", "fill", "jitter", "sigma", "scale", "smooth",
    "decay", "decay2", "decay_mask", "penalty",
    "update", "opt_mask", "s1", "s2", "hyper",
    "good", "barrier", "bad", "failed", "image0", "reduce", "thread_update", "meet",
)
FIELD = {name: i for i, name in enumerate(FIELDS)}
SEEDS = ("dropout", "noise", "shift")  # each step's three seeds, in this order (int64)
HYPER_FLOATS = 16  # floats of one step's optimizer constants (``Optimizer.constants``, zero-padded)
BARRIER_INT64S = 32  # the barrier: a counter and a generation, a cache line apart, and room
PARAM_GRAIN = 16  # a thread's slice of the parameters starts on a 64-byte boundary
MAX_RUN_STEPS = 256
REDUCE = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)  # ``reduce(step)``: see NativeRun
RUN_FLOATS = 1 << 22  # a run's outputs kept for Python (the accuracy): at most this many floats
RUN_SECONDS = 0.05  # a run's length in steps is chosen to take about this long: Ctrl-C acts within it
# what the ranks add up with each step's gradient: the losses' verdict (non-zero: some rank's were not finite), the
# step's loss (times the loss's scale) and right predictions, the interrupts, rank 0's seconds since the run began
TALLY = ("bad", "loss", "right", "interrupted", "seconds")


def f32_bits(value: float) -> int:
    """A float32's bit pattern, as a field of ``ctx`` holds it."""
    return int(np.array(value, dtype=np.float32).view(np.int32))


def unsupported(model: Any, settings: Any, gather: Any, optimizer: Any) -> str | None:
    """Why `fit` cannot run steps natively in runs with these settings (None: it can).

    The per-step path stays for: a model with ``native_runs = False``; an artifact built before runs existed;
    batchnorm (its steps are phases with reductions in Python between them, across the ranks of an MPI job
    too); gradient clipping (a global norm); an optimizer without a native update (a subclass of a built-in
    one); a stored set that the native gather cannot read. (A data-parallel job runs natively too: the run
    calls back into Python once a step for the ranks' sum, see ``NativeRun``.)
    """
    if not model.native_runs:
        return "switched off (native_runs = False)"
    if model.statistics is not None:
        return "batchnorm"
    if settings.clip_norm is not None:
        return "gradient clipping"
    if gather is None or not model.has_runs:
        return "an artifact built before native runs"
    if model.native_update(optimizer) is None:
        return f"{type(optimizer).__name__} has no native update"
    return None


class NativeRun:
    """The ``ctx`` of one ``fit`` run and its buffers: ``run`` takes a run of steps of `batch` images each.

    Built once per training run; each ``run`` call fills in the run's rows,
    targets, seeds and optimizer constants, then every thread of the model's
    pool calls the run entry. `good` is the training loop's snapshot buffer
    (the weights before the last update), written natively.

    In a rank of a data-parallel job (`comm` of more than one rank, see
    ``cnnc_runtime.distributed``) each step's images are the rank's part of
    the global batch, and the run calls ``reduce`` (a ctypes callback) once
    a step, on one thread, between the backward pass and the update: it sums
    the gradient across the ranks (``comm.sum_in_place``, as the per-step path
    does, so the weights are the same bits) and, in the same collective, the
    step's ``TALLY``: whether any rank's losses were not finite (so all stop
    at the same step), the step's loss and right predictions (``tallies``)
    and whether any rank was interrupted. One synchronization a step, none
    between runs. An exception in it (a failed collective, a second Ctrl-C)
    ends the run and is raised by ``run``.

    Where the ranks share a machine (``comm.update_slice``), the update is
    sharded (``cnnc_runtime.sharded``): the run works on one shared copy of the
    weights, of ``good`` and of the optimizer's state, each rank summing,
    checking and updating only its part, and ``meet`` (a second callback)
    joins the ranks' verdicts before the update and orders the update before
    the next step. Python must call ``settle`` before it uses the model's
    weights, ``good`` or the optimizer's state after a run.
    """

    def __init__(self, model: Any, loss: str, gather: Any, targets: np.ndarray, optimizer: Any, settings: Any,
                 fill: np.ndarray | None, good: np.ndarray, comm: Any = None,
                 interrupted: Callable[[], bool] = lambda: False) -> None:
        self.model, self.loss, self.optimizer, self.gather = model, loss, optimizer, gather
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.targets = targets
        k = model.manifest["loss_inputs"][loss]
        batch = len(gather.out)
        self.max_steps = max(1, min(MAX_RUN_STEPS, RUN_FLOATS // (batch * max(k, 1))))
        max_steps = self.max_steps
        src, geometry, norm, byte = gather.source()
        self.rows = np.zeros(max_steps * batch, dtype=np.int64)
        self.run_targets = np.zeros((max_steps * batch, *targets.shape[1:]), dtype=targets.dtype)
        self.out = np.zeros((max_steps * batch, k), dtype=np.float32)
        self.losses = np.zeros(max_steps * batch, dtype=np.float32)
        self.seeds = np.zeros((max_steps, len(SEEDS)), dtype=np.int64)
        self.hyper = np.zeros((max_steps, HYPER_FLOATS), dtype=np.float32)
        self.threads = model.threads
        self.penalty = np.zeros((max_steps, self.threads), dtype=np.float64)
        self.bad = np.zeros(self.threads + 1, dtype=np.int64)  # each thread's check; then the reduction's
        self.barrier = np.zeros(BARRIER_INT64S, dtype=np.int64)
        self.fill = fill if fill is not None else np.zeros(1, dtype=np.float32)
        self.ctx = np.zeros(len(FIELDS), dtype=np.int64)
        params = model.flat_params
        self._keep = (src, geometry, norm, gather, good)
        lam = settings.weight_decay
        self._set(byte=int(byte), src=src.ctypes.data, rows=self.rows.ctypes.data, geometry=geometry.ctypes.data,
                  norm=norm.ctypes.data, targets=self.run_targets.ctypes.data,
                  target_bytes=self.run_targets[0].nbytes if len(self.run_targets) else 0,
                  out=self.out.ctypes.data, outputs=k, losses=self.losses.ctypes.data, seeds=self.seeds.ctypes.data,
                  pad=int(settings.crop), flip=int(bool(settings.flip)), fill=self.fill.ctypes.data,
                  jitter=int(settings.jitter > 0), sigma=f32_bits(settings.jitter),
                  smooth=f32_bits(settings.label_smoothing), decay=int(lam > 0), decay2=f32_bits(2 * lam),
                  decay_mask=model.decay_mask.ctypes.data, penalty=self.penalty.ctypes.data,
                  hyper=self.hyper.ctypes.data, good=good.ctypes.data, barrier=self.barrier.ctypes.data,
                  bad=self.bad.ctypes.data, params=params.ctypes.data, x=gather.out.ctypes.data,
                  grad_bytes=params.nbytes)
        self.error: BaseException | None = None
        self._used = 1
        self._tally = np.zeros(len(TALLY), dtype=np.float64)
        self.tallies = np.zeros((max_steps, len(TALLY)), dtype=np.float64)  # each step's, summed over the ranks
        self._interrupted = interrupted
        self._step: dict[str, Any] = {}  # what the callback needs of the current run: see ``run``
        # (kept alive as long as the code may call it)
        self._reduce = REDUCE(self._sum_ranks) if self.comm is not None else None
        # the gradient the ranks sum: flat_grads, or (ranks on one machine) this rank's shared memory, which
        # they sum without copies; the run writes it in place of flat_grads
        self._summed = self.comm.sum_buffer(params.size) if self.comm is not None else None
        self._grads = model.flat_grads if self._summed is None else self._summed
        self._set(reduce=ctypes.cast(self._reduce, ctypes.c_void_p).value if self._reduce else 0)
        part = self.comm.update_slice(params.size) if self._summed is not None else None
        self.shared = SharedWeights(self.comm, params.size, *part) if part is not None else None
        self._meet = REDUCE(self._meet_ranks) if self.shared is not None else None
        self._set(meet=ctypes.cast(self._meet, ctypes.c_void_p).value if self._meet else 0)
        self._verdict = np.zeros(2, dtype=np.float64)  # what a sharded step's ranks add up before the update
        self._penalties = np.zeros(max_steps, dtype=np.float64)  # (their penalties, summed over the ranks)
        self.good = good.reshape(-1)[:params.size]
        self.lam = lam
        self._layouts: dict[int, tuple] = {}

    def _set(self, **fields: int) -> None:
        for name, value in fields.items():
            self.ctx[FIELD[name]] = value

    def _layout(self, m: int, image0: int, whole: int) -> tuple:
        """The shards of a step of `m` images (images [image0, image0 + m) of a batch of `whole`), the threads
        that run them and each thread's slice of the parameters (kept per batch size: an epoch's last batch may
        be smaller)."""
        key = (m, image0, whole)
        got = self._layouts.get(key)
        if got is None:
            got = self.model.run_layout(m, image0, whole)
            if self._summed is not None:
                got[4][0] = self._summed.ctypes.data  # (the first shard's gradient: the one the ranks sum)
            update = got[3].copy()  # each thread's slice of the weights it checks and updates
            if self.shared is not None:  # (of this rank's part, in a sharded update)
                lo, hi = self.shared.lo, self.shared.hi
                parts = [(lo + a, lo + b) for a, b in split(hi - lo, len(update) // 2, PARAM_GRAIN)]
                update = np.array(parts + [(hi, hi)] * (len(update) // 2 - len(parts)), dtype=np.int64).reshape(-1)
            got = (*got, update)
            self._layouts[key] = got
        return got

    def _sum_ranks(self, step: int) -> int:
        """The ranks' sum of the gradient (``reduce``, called by the run's thread 0 with the other threads at a
        barrier): 0; 1 when any rank's losses were not finite; 2 when the sum failed (the exception is kept)."""
        try:
            if self.error is not None:  # (a callback failed: the run is ending, no more collectives)
                return 2
            tally, run = self._tally, self._step
            m = run["m"]
            first = step * m
            tally[0] = float(self.bad[:self._used].any())
            # (as the per-step path adds them: each rank's loss sum in float64 times the scale, then the ranks' sum)
            tally[1] = float(self.losses[first:first + m].sum(dtype=np.float64) * run["scale"])
            labels = run["labels"]
            tally[2] = 0 if labels is None else int(
                (self.out[first:first + m].argmax(axis=1) == labels[first:first + m]).sum())
            tally[3] = float(self._interrupted())
            tally[4] = time.perf_counter() - run["clock"] if self.comm.is_root else 0.0
            self.comm.sum_in_place(self._grads, tally, shard=self.shared is not None)
            self.tallies[step] = tally
            return int(tally[0] != 0)
        except BaseException as e:  # (a callback cannot raise through native code: kept, raised by run)
            self.error = e
            return 2

    def _meet_ranks(self, code: int) -> int:
        """A sharded step's meetings (``meet``, by the run's thread 0 with the others at a barrier): for code 2 s,
        after step s's checks, every rank's verdict and penalty summed (returns 0, or 1 when any rank's checks
        failed; 2 when the meeting failed); for 2 s + 1, after its update, a barrier."""
        try:
            if self.error is not None:
                return 2
            step, after_update = divmod(code, 2)
            if after_update:
                self.comm.meet()
                return 0
            used, verdict = self._used, self._verdict
            verdict[0] = float(self.bad[:used + 1].any())  # (the threads' checks and the reduction's verdict)
            verdict[1] = self.penalty.reshape(-1)[step * used:(step + 1) * used].sum()
            self.comm.meet(verdict)
            self._penalties[step] = verdict[1]
            return int(verdict[0] != 0)
        except BaseException as e:
            self.error = e
            return 2

    def settle(self) -> None:
        """After a sharded run, the shared weights, ``good`` and optimizer state back into the model's and the
        optimizer's own arrays (a collective call: every rank at the same point; nothing when there is none)."""
        if self.shared is not None:
            self.shared.detach()

    def takes_optimizer(self) -> bool:
        """Whether the native update takes the optimizer's state as it is now: a callback between runs may have
        loaded state it cannot take (float64, say), which the per-step path updates in numpy."""
        model = self.model
        return self.optimizer.native_buffers(model.flat_params, model.flat_grads, model.decay_mask) is not None

    def run(self, idx: np.ndarray, m: int, seeds: np.ndarray, lrs: list[float], image0: int = 0,
            whole: int | None = None,
            labels: np.ndarray | None = None) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``len(idx) // m`` steps of `m` images: step s trains on images ``idx[s m:(s + 1) m]`` of the set, with
        ``seeds[s]`` (``SEEDS``) and learning rate ``lrs[s]``. In a rank of a data-parallel job they are images
        [image0, image0 + m) of each step's global batch of `whole` images, and ``tallies[s]`` holds step s's
        ``TALLY`` summed over the ranks (right predictions counted against `labels`, the labels of `idx`) for
        every step the ranks summed: those done and the one that failed.

        Returns (steps done, each step's summed loss (float64, before the scale), the outputs, the penalties
        per step); a step short of `steps` done is one whose loss, gradient or weights were not finite: its
        gradient is in ``flat_grads`` and it made no update. The native call holds the model's lock.
        """
        steps = len(idx) // m
        n = steps * m
        if not (1 <= steps <= self.max_steps and n == len(idx) and len(seeds) == len(lrs) == steps):
            raise ValueError(f"a native run takes 1 to {self.max_steps} whole steps of {m} images, a seed triple "
                             f"and a rate each; got {len(idx)} images, {len(seeds)} seeds, {len(lrs)} rates")
        self.gather.rows_of(idx, self.rows[:n])
        np.take(self.targets, idx, axis=0, out=self.run_targets[:n])
        self.seeds[:steps] = seeds
        optimizer = self.optimizer
        t0 = optimizer.t
        for s in range(steps):  # (the constants of step s: its rate, its step count)
            optimizer.lr = lrs[s]
            optimizer.t += 1
            constants = optimizer.constants()
            self.hyper[s, :len(constants)] = constants
        whole = m if whole is None else whole
        shards, ranges, thread_shards, thread_params, grads, ws, thread_update = self._layout(m, image0, whole)
        self._used = len(thread_shards) // 2
        self.bad[self._used] = 0  # (the reduction's verdict: written by it only)
        # (read every run: a callback between runs may have reset the optimizer, which then makes new state)
        update, pointers = self.model.run_update(optimizer)
        self._set(update=update, opt_mask=pointers[2], s1=pointers[3], s2=pointers[4])
        if self.shared is not None:  # (the run's weights, good and state: the ranks' shared copies)
            private = {"params": self.model.flat_params, "good": self.good}
            private.update(zip(("s1", "s2"), optimizer.state_buffers()))
            self._set(**self.shared.attach(private))
        self._set(steps=steps, batch=m, threads=len(thread_shards) // 2, shards=shards,
                  shard_ranges=ranges.ctypes.data, thread_shards=thread_shards.ctypes.data,
                  thread_params=thread_params.ctypes.data, grads=grads.ctypes.data, ws=ws.ctypes.data,
                  thread_update=thread_update.ctypes.data,
                  failed=-1, scale=f32_bits(self.model.loss_scale(self.loss, whole)), image0=image0)
        self._step = {"m": m, "scale": self.model.loss_scale(self.loss, whole), "labels": labels,
                      "clock": time.perf_counter()}
        self.model.run_steps(self.loss, self.ctx, len(thread_shards) // 2, m)
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        failed = int(self.ctx[FIELD["failed"]])
        done = steps if failed < 0 else failed
        if done < steps and self.shared is not None:  # (the failed step's gradient, where run promises)
            self.comm.gather_sum(self.model.flat_grads)
        elif done < steps and self._summed is not None:
            np.copyto(self.model.flat_grads, self._summed)
        optimizer.t = t0 + done  # a failed step made no update
        optimizer.lr = lrs[min(done, steps - 1)]
        sums = self.losses[:n].reshape(steps, m).sum(axis=1, dtype=np.float64)
        used = len(thread_shards) // 2  # (the threads that ran: the code wrote penalty[s * used + t])
        if self.shared is not None:  # (each rank's penalty is of its part: summed over the ranks by meet)
            penalties = self.lam * self._penalties[:steps].copy()
        else:
            penalties = self.lam * self.penalty.reshape(-1)[:steps * used].reshape(steps, used).sum(axis=1)
        return done, sums, self.out[:n], penalties


def run_length(step_seconds: float, limit: int) -> int:
    """Steps per run: about RUN_SECONDS of work (Ctrl-C and the progress bar act between runs), at most `limit`."""
    if not step_seconds > 0 or not math.isfinite(step_seconds):
        return 1
    return max(1, min(limit, int(RUN_SECONDS / step_seconds)))


def call_threads(fn: Any, ctx: np.ndarray, threads: int, pool_threads: int) -> None:
    """``fn(ctx, t)`` on `threads` threads of the shared pool at once (they meet at barriers: all must run)."""
    address = ctx.ctypes.data
    if threads == 1:
        fn(address, 0)
        return
    shared_pool(pool_threads).run([lambda t=t: fn(address, t) for t in range(threads)])


__all__ = ["FIELDS", "HYPER_FLOATS", "NativeRun", "SEEDS", "TALLY", "call_threads", "f32_bits", "run_length",
           "unsupported"]
