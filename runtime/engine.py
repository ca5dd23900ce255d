"""``Engine``: a compiled network in this process, with its parameters, and the public step API it is run by.

The layers of the runtime: this module runs the native code (inference, one
training step's gradients, input noise, the optimizer update); ``train`` is
the training loop on top of it (``fit``, ``evaluate``); ``model`` joins both
into the user-facing ``Model``. Nothing here imports ``train`` or ``model``.

All parameters live in one flat, 64-byte-aligned float32 buffer; ``params``
maps each parameter name to a writable view of it, so writing into a view
changes the model. Gradients use a second buffer of the same layout.
Batchnorm's running statistics are state, not parameters: ``buffers`` maps
``NAME.running_mean`` / ``NAME.running_var`` to views of a third buffer,
``flat_state``, which no optimizer and no weight decay sees.

Inputs are prepared by one rule (``cnnc_runtime.inputs``) before any native
code sees them: ``forward``, ``predict`` and ``value_and_grad`` take images
as a caller holds them ((N, C, H, W), (N, H, W), channels-last or flat; uint8
scaled by 1/255; smaller images zero-padded; then the train section's
``normalize``), and anything that cannot be prepared is a ``ValueError``
naming the expected shape. The step API (``gradients``, ``infer_into``) takes
the network's input as ``prepare`` returns it, and checks that it is.

Threads: an ``Engine`` (so a ``Model``) may be called from several Python threads at once.
Inference takes no lock: each call runs on a scratch set of its own
(activation arena and conv workspaces), taken from a small free list and
given back after the call, so small batches run concurrently; batches of 8
or more go through the process's shared thread pool one at a time. Whatever
writes model-wide state (gradients, ``initialize``, ``load``, assigning into
``params``) takes turns under the model's lock. Reading the parameters while
another thread trains gives a mix of old and new weights, never a crash.
A process forked while the pool runs gets fresh pools and locks.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import threading
import time
import weakref
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from cnnc_runtime import __version__, artifact, fileio
from cnnc_runtime.batchnorm import PHASED_FIELD, PHASED_FIELDS, Reducer, Statistics
from cnnc_runtime.host import host_cpu, missing_features
from cnnc_runtime.inputs import Inputs, normalization
from cnnc_runtime.losses import DEFAULT_LOSS, LOSSES, choices
from cnnc_runtime.memory import check_fits
from cnnc_runtime.native import NativeLibrary
from cnnc_runtime.parallel import available_cores, check_threads, default_threads, shared_pool, split
from cnnc_runtime.steploop import FIELD as RUN_FIELD
from cnnc_runtime.steploop import PARAM_GRAIN, call_threads, f32_bits

CHUNK = 256  # images per native call when a large array is run: bounds the arena's size
# A thread runs its share of a chunk INFER_RUN images at a time, each run through every layer, so that one layer's
# output is still in that core's cache when the next layer reads it (128 images a layer: every activation went
# through memory; ResNet-20 took ~10% more CPU per image). Each run pays its Winograd weight transforms again.
INFER_RUN = 16
MIN_IMAGES_PER_THREAD = 4
# A training step cuts each chunk into shards by its size alone (SHARD_IMAGES or more images each, but at least two
# shards where there are 2 * MIN_IMAGES_PER_THREAD images, so two cores always share a step; at most MAX_SHARDS),
# sums each shard's gradient into its own buffer and adds those in order: the same bits on any number of threads.
# (Smaller shards cost more than they give: at 16 images LeNet-5's step took ~6% more CPU on 2 threads.)
SHARD_IMAGES = 32
MIN_SHARDS = 2
MAX_SHARDS = 8
SPARE_SCRATCH = 4  # idle per-call scratch sets a model keeps for later calls
BARRIER_INT64S = 16  # infer_split's barrier: a counter and a generation, a cache line apart
CLAIM_INT64S = 8  # infer_claim's counter: a cache line


class SplitChoice:
    """Whether a small batch runs on all threads at once (``infer_split``) or on one, by their recent speed.

    Sharing an image pays only while both cores are free: on a busy machine
    each barrier waits for a descheduled thread, and one thread is faster. So
    both ways are timed (wall seconds per image, the median of the last
    ``KEEP`` calls each way: one preempted call does not flip it); the faster
    runs, and after every ``PROBE`` calls a probe tries the other, so a change
    of load is followed within some tens of calls. A shared call that had to start the pool's
    server first (``Pool.run_served``: it leaves when idle, so a probe after a
    run of one-thread calls usually finds it gone) is timed from the moment
    the server took it: the start is paid once by a run of shared calls, and
    timing it made every probe lose (measured on a loaded machine: a probe
    took 1.5x a shared call in a run, at the 5th percentile), so one thread
    kept running once chosen. A probe of sharing is ``BURST`` calls, of which
    only the last ``TIMED`` are timed (a probe of one thread is one call),
    and a probe's times replace that way's older ones: a core that has idled
    meanwhile is slow for some calls (on this VM shared calls after a run of
    one-thread calls took 700-1,000 us for several calls, then 245-250 us,
    where one thread took 390-420), and probes of two calls, timed against
    older probes' times, kept ResNet-20 at batch 1 on one thread most of the
    time. Calls from several threads may
    race on the averages: the cost is a slightly worse choice, never a wrong
    result.
    """

    PROBE = 64  # calls the faster way runs between two probes of the other
    BURST = 8  # calls a probe of sharing makes: the first ones wake and warm the other core and are not timed
    TIMED = 2  # the last calls of a probe of sharing, timed (a probe of one thread is one call, timed)
    KEEP = 5  # calls timed each way whose median is that way's time

    def __init__(self, fixed: bool | None = None) -> None:
        """`fixed`: always that way (True: shared), unmeasured; tests pin the path they check."""
        self.fixed = fixed
        self.times: dict[bool, list[float]] = {True: [], False: []}  # the last KEEP calls' seconds each way
        self.seconds: dict[bool, float | None] = {True: None, False: None}  # their medians
        self.calls = 0  # calls outside probes
        self.left = 0  # calls left in the probe running now
        self.way = False  # the way that probe tries
        self.ran = {True: 0, False: 0}  # calls timed each way (benchmarks report the share)
        self.warming = False  # the call running now warms a probe up: not timed

    def shared(self) -> bool:
        """Whether the next small batch should run on all threads."""
        if self.fixed is not None:
            return self.fixed
        if self.left <= 0:  # (racing calls may take it below 0: a new choice then)
            self.calls += 1
            unknown = [way for way in (True, False) if self.seconds[way] is None]  # each way measured first
            if not unknown and self.calls % self.PROBE:
                self.warming = False
                return self.best()
            self.way = unknown[0] if unknown else not self.best()
            self.left = self.BURST if self.way else 1
            self.times[self.way] = []  # (older times: before the load changed, if it did; a new list, as another
            # thread's record may hold the old one)
        self.left -= 1
        self.warming = self.left >= self.TIMED
        return self.way

    def best(self) -> bool:
        """The way that measured faster (both measured)."""
        return self.seconds[True] <= self.seconds[False]

    def record(self, shared: bool, seconds: float) -> None:
        """A call's wall seconds per image (a shared call's without its wait for a server to start)."""
        self.ran[shared] += 1
        if self.warming:
            return
        times = self.times[shared]
        times.append(seconds)
        del times[:-self.KEEP]
        ordered = sorted(times)  # (np.median costs ~10 us a call; this, under 1; a copy: other threads append)
        half = len(ordered) // 2
        self.seconds[shared] = ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


ALIGN_BYTES = 64
P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def aligned_zeros(n: int) -> np.ndarray:
    """A zeroed float32 array of n elements whose data starts on a 64-byte boundary."""
    raw = np.zeros(n + ALIGN_BYTES // 4, dtype=np.float32)
    skip = (-raw.ctypes.data % ALIGN_BYTES) // 4
    return raw[skip:skip + n]


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


@functools.lru_cache(maxsize=64)
def shards(n: int) -> tuple[tuple[int, int], ...]:
    """A training chunk of `n` images cut into gradient shards: by `n` alone, never by the thread count."""
    return tuple(split(n, min(MAX_SHARDS, max(MIN_SHARDS, n // SHARD_IMAGES)), MIN_IMAGES_PER_THREAD))


@functools.lru_cache(maxsize=64)
def part_shards(start: int, stop: int, image0: int, whole: int, chunk: int) -> tuple[tuple[int, int], ...]:
    """The shards of images [start, stop) of a part of a batch: those one process cuts the whole batch into, cut
    again at the part's edges.

    The part's first image is image `image0` of a batch of `whole` images, which one process runs in chunks of
    `chunk`. So the ranks of a data-parallel step compute the very shards one process would, and a rank of one
    thread cuts its share no smaller than that (two ranks at batch 64: one shard of 32 each, not two of 16; their
    all-reduce is then the one addition one process makes). Shards are relative to `start`; for a whole batch this
    is ``shards``.
    """
    lo, hi = image0 + start, image0 + stop
    pieces = []
    for c in range(lo - lo % chunk, hi, chunk):
        for a, b in shards(min(whole, c + chunk) - c):
            a, b = max(c + a, lo), min(c + b, hi)
            if a < b:
                pieces.append((a - lo, b - lo))
    return tuple(pieces)


@functools.lru_cache(maxsize=64)
def _thread_ranges(n: int, threads: int, grain: int) -> tuple[tuple[int, int], ...]:
    """[0, n) across `threads` threads (cached: a training loop asks the same every step)."""
    return tuple(split(n, threads, grain)) if threads > 1 else ((0, n),)


class Scratch:
    """One call's private buffers: a conv workspace per pool thread and activation arenas (grown, never shrunk).

    A call holds its set for its whole duration, so no other call writes, grows or frees them meanwhile.
    """

    def __init__(self, ws_floats: int, threads: int, arena_floats: dict[str, int], folded_floats: int = 0,
                 cache_floats: int = 0) -> None:
        # inference's kept Winograd weights (``cache_floats``, zeroed: valid) lie in front of each thread's `ws`
        self.ws = [aligned_zeros(cache_floats + ws_floats) for _ in range(threads)]
        self.ws_ptrs = [w.ctypes.data + 4 * cache_floats for w in self.ws]
        self.folded = aligned_zeros(folded_floats) if folded_floats else None  # batchnorm: inference coefficients
        self.folded_ptr = self.folded.ctypes.data if folded_floats else 0
        # infer_split's barrier (its count returns to 0 at every barrier, so a set can be reused); after it, in a
        # cache line of its own, infer_claim's counter
        self.barrier = np.zeros(BARRIER_INT64S + CLAIM_INT64S, dtype=np.int64)
        self.barrier_ptr = self.barrier.ctypes.data
        self.counter = self.barrier[BARRIER_INT64S:]
        self.counter_ptr = self.counter.ctypes.data
        self._per_image = arena_floats
        self._arenas: dict[str, tuple[np.ndarray, int]] = {}

    def arena(self, kind: str, images: int) -> int:
        """The address of an arena of at least `images` slots for `kind` ("infer" or "train")."""
        need = self._per_image[kind] * images
        got = self._arenas.get(kind)
        if got is None or got[0].size < need:
            check_fits(4 * need, f"the activations of {images} images")
            buf = aligned_zeros(need)
            got = self._arenas[kind] = (buf, buf.ctypes.data)
        return got[1]


class Params(Mapping):
    """A model's parameters by name, each a writable view into the model's flat buffer.

    ``params[name] = array`` copies into that view (same shape, real or
    integer values, converted to float32); names cannot be added or removed.
    """

    def __init__(self, model: Engine, views: dict[str, np.ndarray], what: str = "parameter") -> None:
        self._model = weakref.proxy(model)  # no cycle: a model's buffers go when the model does
        self._views = views
        self._what = what

    def __getitem__(self, name: str) -> np.ndarray:
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in self._views:
            raise ValueError(f"network {self._model.name} has no {self._what} {name!r}; it has "
                             f"{', '.join(self._views) or 'none'}"[:500])
        self._model._assign({name: value}, f"{'params' if self._what == 'parameter' else 'buffers'}[{name!r}]")

    def __delitem__(self, name: str) -> None:
        raise ValueError(f"{self._what}s cannot be removed from network {self._model.name}")

    def __repr__(self) -> str:
        kind = "Params(" if self._what == "parameter" else "Buffers("
        return kind + ", ".join(f"{k}: {_fmt(v.shape)}" for k, v in self._views.items()) + ")"


_MODELS: weakref.WeakSet[Engine] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    """A lock held by another thread at a fork would stay held forever in the child: give every model a new one."""
    for model in list(_MODELS):
        model.lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_locks_after_fork)


class NativeUpdate:
    """An optimizer loop in a model's code; holds that code, so an optimizer may outlive the model."""

    def __init__(self, fn, lib: NativeLibrary) -> None:
        self._fn = fn
        self._lib = lib

    def __call__(self, *args: int) -> None:
        self._fn(*args)


class NativeGather:
    """Gathers training batches from one ``Inputs`` set into one batch buffer, natively (``cnnc.codegen.gather``).

    ``select(idx)`` names the next batch (positions in the set, checked);
    then ``gather(a, b)``, on any thread, writes its images [a, b) into the
    buffer: bit for bit what ``Inputs.batch`` writes, without the GIL, so
    pool threads gather their shares at once. It holds the set, the buffer
    and the model's code while it lives.
    """

    def __init__(self, fns: dict[bool, Any], inputs: Inputs, out: np.ndarray, lib: NativeLibrary) -> None:
        byte, stored, geometry, norm = inputs.layout()
        self._inputs = inputs
        self._byte = byte
        self.out = out
        self._rows = np.zeros(len(out), dtype=np.int64)  # the selected batch's stored images
        self._count = 0
        self._keep = (stored, geometry, norm, out, lib)
        self._fn = fns[byte]
        self._args = (stored.ctypes.data, self._rows.ctypes.data, out.ctypes.data, geometry.ctypes.data,
                      norm.ctypes.data)

    def select(self, idx: np.ndarray) -> None:
        """The batch to gather next: the inputs at positions `idx` of the set, at most the buffer's length."""
        n, m = len(self._inputs), len(idx)
        if m > len(self._rows) or (m and not (0 <= int(idx.min()) and int(idx.max()) < n)):
            raise ValueError(f"gather needs at most {len(self._rows)} positions in [0, {n}), got {m}")
        self._inputs.stored_rows(idx, self._rows)
        self._count = m

    def source(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """(the stored images, their geometry, the normalization, whether they are uint8): what the gather
        kernels read besides the rows (``cnnc_runtime.steploop`` passes them to a run of steps)."""
        stored, geometry, norm = self._keep[:3]
        return stored, geometry, norm, self._byte

    def rows_of(self, idx: np.ndarray, out: np.ndarray) -> None:
        """The stored images at positions `idx` of the set, into the int64 array `out` (checked as ``select``)."""
        n = len(self._inputs)
        if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < n):
            raise ValueError(f"gather needs positions in [0, {n}), got {int(idx.min())}..{int(idx.max())}")
        self._inputs.stored_rows(idx, out)

    def __call__(self, a: int, b: int) -> None:
        if not 0 <= a <= b <= self._count:
            raise ValueError(f"gather rows ({a}, {b}) are not a range of the {self._count} images selected")
        self._fn(*self._args, a, b)


MAX_CROP_PAD = 1 << 15  # the crop's draws take 16 bits


def check_augment(pad: int, input_shape: tuple[int, ...], flip: bool = False) -> None:
    """ValueError unless `pad` (the crop's padding) and `flip` suit inputs of `input_shape`."""
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad < MAX_CROP_PAD:
        raise ValueError(f"crop pad must be an integer in [0, {MAX_CROP_PAD}), got {pad!r}")
    if (pad or flip) and len(input_shape) != 3:
        raise ValueError(f"crop and flip need image inputs (C, H, W); this network takes vectors {input_shape}")


def check_smoothing(smoothing: float, loss: str) -> None:
    """ValueError unless `smoothing` is a label smoothing in [0, 1) that `loss` can take (a loss of class labels:
    cross-entropy)."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ValueError(f"label_smoothing must be a fraction in [0, 1), got {smoothing!r}")
    if smoothing and not (loss in LOSSES and LOSSES[loss].labels):
        labelled = " or ".join(name for name, entry in LOSSES.items() if entry.labels)
        raise ValueError(f"label_smoothing applies to {labelled}, not to {loss}")


def compatible_version(built: str, running: str) -> bool:
    """Artifacts are compatible within a major.minor release of cnnc."""
    return built.split(".")[:2] == running.split(".")[:2]


class Engine:
    """A compiled network: its parameters, inference, one training step's gradient, save and load.

    The training loop (``cnnc_runtime.train``) drives it through its public
    methods: ``gradients``, ``add_noise``, ``update``, ``infer_into`` and
    ``lock``; users get it as a ``cnnc_runtime.model.Model``, which adds ``fit``.
    """

    def __init__(self, manifest: dict[str, Any], obj: bytes, weights: bytes = b"", seed: int | None = None,
                 threads: int | None = None) -> None:
        """`seed` draws the first weights (default: the train section's ``seed``, else 0)."""
        artifact.validate(manifest)  # (the format version too)
        artifact.verify_code(manifest, obj)
        if not compatible_version(manifest.get("cnnc_version", "?"), __version__):
            raise ValueError(f"artifact built by cnnc {manifest.get('cnnc_version')} cannot be run by cnnc "
                             f"{__version__}; recompile the network")
        t = manifest["target"]
        triple, _, _ = host_cpu()
        if t["triple"].split("-")[0] != triple.split("-")[0]:
            raise ValueError(f"artifact built for {t['triple']}, but this machine is {triple}")
        missing = missing_features(t["features"])
        if missing:
            raise ValueError(f"artifact built for a {t['cpu']} CPU; this CPU lacks {', '.join(missing)}. "
                             f"Recompile here (or with CNNC_TARGET=generic for any x86-64)")
        self.manifest = manifest
        self._normalize = manifest["train"].get("normalize")  # (what ``prepare`` applies after scaling and padding)
        self.name: str = manifest["network"]
        self.input_shape: tuple[int, ...] = tuple(manifest["input"]["shape"])
        self.output_shape: tuple[int, ...] = tuple(manifest["output"]["shape"])
        self._norm = normalization(self._normalize, self.input_shape)  # (mean, std) float32 arrays, or None
        self._output_floats = int(np.prod(self.output_shape))
        self._input_floats = int(np.prod(self.input_shape))
        self._threads = default_threads() if threads is None else check_threads(threads)
        size, ws_floats = int(manifest["param_floats"]), max(int(manifest["ws_floats"]), 16)
        cache_floats = int(manifest.get("ws_cache_floats", 0))
        # flat_params, flat_grads, decay_mask (float32), trainable_mask (bool); the conv workspaces of the
        # training set and of one inference set (with its kept Winograd weights); and the activations of one
        # image, inferring and training
        check_fits(13 * size + 4 * (2 * ws_floats + cache_floats) * self.threads
                   + 4 * (int(manifest["arena_infer"]) + int(manifest["arena_train"])), f"network {self.name}")
        self._lib = NativeLibrary(obj, t["triple"], t["cpu"], t["features"])
        self._obj = obj
        self._infer = self._lib.function("infer", [P, P, P, P, P, P, I64, I64])
        # one image on several threads (cnnc.codegen.split): when this many pool threads have a core each
        parts = int(manifest.get("infer_parts", 0))
        self._split_parts = parts if 1 < parts <= min(self.threads, len(available_cores())) else 0
        self._infer_split = (self._lib.function("infer_split", [P] * 7 + [I64, I64, I64])
                             if self._split_parts else None)
        self.split_choice = SplitChoice()
        # a batch whose threads take its images (and bands of the last ones) from a counter, where compiled
        self._infer_claim = (self._lib.function("infer_claim", [P] * 7 + [I64, I64])
                             if manifest.get("infer_claim", False) else None)
        # its second share handed to a pool thread waiting in native code (cnnc.codegen.handoff), where compiled
        self._split_handoff = None
        if self._split_parts == 2 and manifest.get("infer_handoff", False):
            self._split_handoff = (self._lib.function("split_call", [P, I64] + [P] * 8 + [I64, I64], I64),
                                   self._lib.function("split_serve", [P]))
        bn = manifest.get("batchnorm")
        step_args = [P] * 10 + [I64, I64, F32, F32, I64, I64]
        syncs = bn["phases"] if bn else {loss: [] for loss in LOSSES}
        # each loss's step: one native function, or one per phase with batchnorm (cnnc_runtime.batchnorm)
        self._steps = {loss: [self._lib.function(f"step_{loss}" + (f"_{k}" if k else ""), step_args)
                              for k in range(len(syncs[loss]) + 1)] for loss in LOSSES}
        self._jitter = self._lib.function("jitter", [P, I64, I64, F32, P, I64, I64])
        self._augment = self._lib.function("augment", [P, I64, I64, I64, I64, P, P, I64, I64])
        try:  # (an artifact saved by an earlier 0.x release has no gather: batches are gathered by numpy)
            self._gathers = {byte: self._lib.function(f"gather_{kind}", [P] * 5 + [I64, I64])
                             for byte, kind in ((True, "u8"), (False, "f32"))}
        except KeyError:
            self._gathers = None
        # runs of steps in one native call per thread (cnnc_runtime.steploop), where the code reads a run's ctx
        # as this runtime lays it out (none with batchnorm, nor in code built before runs existed)
        self._runs = {loss: self._lib.function(f"run_{loss}", [P, I64]) for loss in LOSSES} \
            if manifest.get("run_fields") == list(RUN_FIELD) else {}
        # a step with batchnorm in one native call per thread, the reductions in native code (cnnc.codegen.bnphases),
        # where the code reads its ctx as this runtime lays it out (else the phases one by one from Python)
        self._phased_steps = {loss: self._lib.function(f"phased_{loss}", [P, I64]) for loss in LOSSES} \
            if manifest.get("phased_fields") == list(PHASED_FIELDS) else {}
        self._phased_barrier = np.zeros(BARRIER_INT64S, dtype=np.int64)
        self._updates: dict[str, Any] = {}
        # fit runs steps in native runs where it can (cnnc_runtime.steploop); False: every step through
        # ``gradients`` and ``update``, which a caller may wrap to observe each step
        self.native_runs = True
        self.flat_params = aligned_zeros(size)
        self.flat_grads = aligned_zeros(size)
        self._layout = manifest["params"]
        self._by_name = {p["name"]: p for p in self._layout}
        self.params = Params(self, {p["name"]: self._view(self.flat_params, p) for p in self._layout})
        # the last gradient (what ``gradients`` wrote) by parameter name: views of flat_grads, to read
        self.grads: dict[str, np.ndarray] = {p["name"]: self._view(self.flat_grads, p) for p in self._layout}
        # batchnorm's running statistics: state in a buffer of their own, which no optimizer sees
        self._state_layout = bn["state"] if bn else []
        self.flat_state = aligned_zeros(bn["state_floats"] if bn else 0)
        self.buffers = Params(self, {p["name"]: self._view(self.flat_state, p) for p in self._state_layout},
                              "buffer")
        self._by_name.update({p["name"]: p | {"fixed": None} for p in self._state_layout})
        self.batches_tracked = 0  # training steps taken (saved as PyTorch's num_batches_tracked)
        self.statistics = Statistics(bn, aligned_zeros) if bn else None
        self._fold = self._lib.function("fold", [P, P, P, I64, I64]) if bn else None
        self._folded_floats = int(bn["inference_floats"]) if bn else 0
        self.trainable_mask = np.zeros(size, dtype=bool)
        self.decay_mask = np.zeros(size, dtype=np.float32)
        for p in self._layout:
            span = slice(p["offset"], p["offset"] + p["size"])
            self.trainable_mask[span] = p["trainable"]
            self.decay_mask[span] = 1.0 if (p["trainable"] and p["decay"]) else 0.0
        # Model-wide writes (gradients, initialize, load, params[...] = ...) take turns under this lock;
        # inference takes no lock: each call runs on a scratch set of its own from `_spare`.
        self.lock = threading.RLock()
        self._arena_floats = {"infer": int(manifest["arena_infer"]), "train": int(manifest["arena_train"])}
        self._ws_floats, self._cache_floats = ws_floats, cache_floats
        self._spare: list[Scratch] = []
        self._train_scratch = Scratch(ws_floats, self.threads, self._arena_floats)  # used under the lock
        self._shard_grads = [self.flat_grads]  # shard 0 sums into flat_grads; the others get their own buffers
        # these buffers never move (updates write into them), so their addresses are read once
        self._params_ptr = self.flat_params.ctypes.data
        self._shard_ptrs = [self.flat_grads.ctypes.data]
        _MODELS.add(self)
        self.initialize(manifest["train"].get("seed", 0) if seed is None else seed)
        self.carries_weights = bool(weights)  # an artifact's own weights were loaded (cnnc eval needs no --weights)
        if weights:
            self._load_file(io.BytesIO(weights), "the artifact's weights")

    # ---- parameters ---------------------------------------------------------

    @staticmethod
    def _view(buf: np.ndarray, p: dict) -> np.ndarray:
        return buf[p["offset"]:p["offset"] + p["size"]].reshape(p["shape"])

    def initialize(self, seed: int = 0) -> None:
        """Fresh weights, reproducible from `seed`.

        Weights are drawn from a normal with standard deviation sqrt(g / fan_in),
        fan_in = in_channels/groups * kh * kw (conv) or in_features (dense):
        g = 2 for layers that feed a ReLU (He et al. 2015), g = 1 otherwise
        (LeCun et al. 1998). With a ``connect`` table, fan_in counts only the
        connected inputs and unconnected weights are zero. Biases start at 0;
        weights written in the .cnn file are copied in.
        """
        rng = np.random.default_rng(seed)
        with self.lock:
            for p in self._layout:
                self.params[p["name"]][...] = self._initial(p, rng)
            for p in self._state_layout:
                self.buffers[p["name"]][...] = 1.0 if p["init"] == "ones" else 0.0
            self.batches_tracked = 0

    def _initial(self, p: dict, rng: np.random.Generator) -> np.ndarray | float:
        if p["fixed"] is not None:
            return np.asarray(p["fixed"], dtype=np.float32)
        if p["kind"] == "bias" or p["init"]["scheme"] == "zeros":
            return 0.0
        if p["init"]["scheme"] == "ones":
            return 1.0
        gain = 2.0 if p["init"]["scheme"] == "he" else 1.0
        shape = p["shape"]
        w = rng.standard_normal(shape, dtype=np.float32)
        if p["connect"] is not None:
            mask = self.connect_mask(p)
            fan_in = mask.sum(axis=1, keepdims=True) * int(np.prod(shape[2:]))
            w *= np.sqrt(gain / fan_in).reshape(-1, 1, 1, 1).astype(np.float32)
            w *= mask[:, :, None, None]
        else:
            w *= np.float32(np.sqrt(gain / max(p["init"]["fan_in"], 1)))
        return w

    @staticmethod
    def connect_mask(p: dict) -> np.ndarray:
        """(out, in) of 0/1: which input channels each output channel of a tabled conv reads."""
        return artifact.connect_mask(p["connect"], p["shape"])

    def state(self) -> dict[str, np.ndarray]:
        """Copies of all parameters and buffers by name (what ``save`` writes).

        With batchnorm the names are PyTorch's ``state_dict`` names for the
        same layer names, ``NAME.num_batches_tracked`` (the training steps taken,
        int64) included; cnnc's momentum is always a number, so that count
        changes nothing here (PyTorch reads it only with ``momentum=None``).
        """
        out = {k: v.copy() for k, v in self.params.items()}
        out.update({k: v.copy() for k, v in self.buffers.items()})
        for name in self._tracked_names():
            out[name] = np.array(self.batches_tracked, dtype=np.int64)
        return out

    def snapshot(self, out: np.ndarray | None = None) -> np.ndarray:
        """All trained values in one flat float32 array: the parameters, then batchnorm's running statistics.

        What the training loop keeps (the best epoch's weights, a restart's, the last finite step's) and
        ``restore`` puts back; `out` (from an earlier call) is filled instead of a new array.
        """
        size = self.flat_params.size
        if out is None:
            out = np.empty(size + self.flat_state.size, dtype=np.float32)
        out[:size] = self.flat_params
        out[size:] = self.flat_state
        return out

    def restore(self, snapshot: np.ndarray) -> None:
        """Put back what ``snapshot`` took."""
        size = self.flat_params.size
        with self.lock:
            self.flat_params[...] = snapshot[:size]
            self.flat_state[...] = snapshot[size:]

    def _tracked_names(self) -> list[str]:
        return [f"{p['layer']}.num_batches_tracked" for p in self._state_layout if p["kind"] == "running_mean"]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights (and batchnorm's state) as .npz keyed by name, atomically (temp file, fsync, rename)."""
        fileio.atomic_save_npz(path, self.state())

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read weights saved by ``save``: all or nothing.

        ``ValueError`` (the model unchanged) for names or shapes that do not
        match, values that are not finite real numbers, a file that is not an
        .npz, and values that differ from weights fixed in the network's source.
        """
        self._load_file(path, str(path))

    def _load_file(self, file: Any, source: str) -> None:
        """Weights from an .npz file (a path or a binary file object); ``ValueError`` naming `source` if unusable."""
        try:
            data = np.load(file)
            if not isinstance(data, Mapping):
                raise ValueError(f"{source}: not a weights file written by save() (.npz): it holds one array "
                                 f"(.npy), not one array per parameter")
            with data:
                self.load_arrays(data, source)
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{source}: cannot read weights ({e})") from None
        except MemoryError:
            raise ValueError(f"{source}: holds arrays too large for this machine's memory") from None
        except (ValueError, TypeError) as e:
            if str(e).startswith(source):
                raise
            raise ValueError(f"{source}: not a weights file written by save() (.npz): {e}") from None

    def load_arrays(self, data: Mapping[str, np.ndarray], source: str) -> None:
        """Every parameter from `data` (name -> array), all or nothing, as ``load`` does; errors name `source`."""
        names = set(data.keys())
        tracked = set(self._tracked_names())  # optional: PyTorch's step count, or a file without it
        wanted = set(self.params) | set(self.buffers)
        missing = sorted(wanted - names)
        extra = sorted(names - wanted - tracked)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected {', '.join(extra)}")
            raise ValueError(f"{source} does not match network {self.name}: {'; '.join(parts)}")
        counts = [data[name] for name in sorted(tracked & names)]
        for name, count in zip(sorted(tracked & names), counts):
            if count.shape != () or count.dtype.kind not in "iu" or count < 0:
                raise ValueError(f"{source}: {name} must be a non-negative integer scalar, got {count.dtype} "
                                 f"{_fmt(count.shape)}")
        self._assign({name: data[name] for name in sorted(wanted)}, source)
        if counts:
            self.batches_tracked = int(counts[0])

    def _assign(self, values: Mapping[str, Any], source: str) -> None:
        """Copy `values` into the named parameters and buffers, after checking them all: all or nothing."""
        checked = {name: self._as_param(name, value, source) for name, value in values.items()}
        with self.lock:
            for name, arr in checked.items():
                (self.params if name in self.params else self.buffers)[name][...] = arr

    def _as_param(self, name: str, value: Any, source: str) -> np.ndarray:
        """`value` as float32 for parameter `name`, or ``ValueError`` naming the parameter and what it needs."""
        p = self._by_name[name]
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{source}: {name} is not an array of numbers ({e})") from None
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"{source}: {name} has dtype {arr.dtype}; parameters take real or integer values")
        if arr.shape != tuple(p["shape"]):
            raise ValueError(f"{source}: {name} has shape {_fmt(arr.shape)}, the network needs {_fmt(p['shape'])}")
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{source}: {name} holds values that are not finite in float32 (inf, NaN, or "
                             f"beyond +-3.4e38)")
        if p["kind"] == "running_var" and (arr < 0).any():
            raise ValueError(f"{source}: {name} holds negative variances")
        if p["fixed"] is not None and not np.array_equal(arr, np.asarray(p["fixed"], dtype=np.float32)):
            raise ValueError(f"{source}: {name} differs from the weights fixed for it in network {self.name}'s "
                             f"source (weights=[...]); they cannot be changed")
        return arr

    def summary(self) -> str:
        """The `cnnc check` table of this network."""
        return self.manifest["summary"]

    # ---- checking inputs -----------------------------------------------------

    def prepare(self, x: Any) -> np.ndarray:
        """``x`` as the network's input, contiguous float32 ``(N, *input_shape)``, prepared by the one rule.

        The rule (``cnnc_runtime.inputs``): (N, C, H, W), (N, H, W),
        channels-last or flat layouts, smaller images zero-padded; uint8
        scaled by 1/255, other dtypes taken as they are; then the train
        section's ``normalize``. Float32 network inputs with nothing to
        normalize come back as they are, uncopied. ``ValueError`` naming the
        expected shape for anything that cannot be prepared.
        """
        if (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape[1:] == self.input_shape
                and x.ndim == len(self.input_shape) + 1 and x.shape[0] >= 1 and x.flags.c_contiguous):
            if self._norm is None:
                return x  # the common case, checked without building any message
            out = self.batch_buffer(x.shape[0])  # normalized as Inputs.batch does it, without building an Inputs
            np.subtract(x, self._norm[0], out=out)
            out /= self._norm[1]
            return out
        return self.inputs(x).all(self.batch_buffer)

    def inputs(self, x: Any) -> Inputs:
        """``x`` as an ``Inputs`` set to take prepared batches from (uint8 images stay as stored).

        An ``Inputs`` given is taken as it is (it must be for this input
        shape): one built without ``normalize`` hands out inputs unnormalized.
        """
        if isinstance(x, Inputs):
            if x.input_shape != self.input_shape:
                raise ValueError(f"these Inputs are for input shape {_fmt(x.input_shape)}; this network takes "
                                 f"{_fmt(self.input_shape)}")
            return x
        expected = _fmt(("N", *self.input_shape))
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as e:
                raise ValueError(f"expected input of shape {expected} as a numeric array: {e}") from None
        if x.dtype.kind not in "fiub":
            raise ValueError(f"expected input of shape {expected} with a numeric dtype, got dtype {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"expected input of shape {expected}, got {_fmt(x.shape)}")
        if x.shape[0] < 1:
            raise ValueError(f"expected input of shape {expected} with N >= 1, got an empty batch")
        try:
            return Inputs(x, self.input_shape, self._normalize)
        except ValueError as e:
            raise ValueError(f"expected input of shape {expected}, got {_fmt(x.shape)}: {e}") from None

    def batch_buffer(self, n: int) -> np.ndarray:
        """A 64-byte-aligned float32 ``(n, *input_shape)`` buffer for prepared inputs."""
        check_fits(4 * n * self._input_floats, f"a buffer of {n} input images")
        return aligned_zeros(n * self._input_floats).reshape(n, *self.input_shape)

    def check_targets(self, y: Any, n: int, loss: str) -> np.ndarray:
        """Labels (int32, one per image, in range) for cross-entropy; float32 targets for mse."""
        k = self.manifest["loss_inputs"][loss]
        try:
            y = np.asarray(y)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expected {n} labels or targets as a numeric array: {e}") from None
        if LOSSES[loss].labels or y.dtype.kind in "iub":
            if y.dtype.kind not in "iub" or y.shape != (n,):
                raise ValueError(f"expected {n} integer labels of shape ({n},), got {y.dtype} {_fmt(y.shape)}")
            if n and (y.min() < 0 or y.max() >= k):
                bad = int(y.min()) if y.min() < 0 else int(y.max())
                raise ValueError(f"label {bad} is out of range: the network has {k} outputs (labels 0..{k - 1})")
            if LOSSES[loss].labels:
                return np.ascontiguousarray(y, dtype=np.int32)
            onehot = np.zeros((n, k), dtype=np.float32)
            onehot[np.arange(n), y.astype(np.intp)] = 1.0
            return onehot
        if y.dtype.kind != "f" or y.size != n * k or y.ndim < 1 or y.shape[0] != n:
            raise ValueError(f"expected mse targets of shape {_fmt((n, *self.output_shape))}, got {_fmt(y.shape)}")
        return np.ascontiguousarray(y.reshape(n, k), dtype=np.float32)

    # ---- running: the public step API -----------------------------------------

    def forward(self, x: Any) -> np.ndarray:
        """The network's output for a batch (prepared as ``prepare`` says): ``(N, *output_shape)``; dropout is off.

        Safe to call from any thread.
        """
        x = self.prepare(x)
        n = x.shape[0]
        check_fits(4 * n * self._output_floats, f"the outputs of {n} images")
        y = np.empty((n, *self.output_shape), dtype=np.float32)
        self._infer_checked(x, y)
        return y

    __call__ = forward

    def infer_into(self, x: Any, out: np.ndarray) -> np.ndarray:
        """The network's outputs for the batch `x`, written into the caller's `out` (returned): no allocation.

        `x` is the network's input as ``prepare`` returns it (contiguous float32
        ``(N, *input_shape)``, taken as it is: nothing is scaled or normalized)
        and `out` a writable contiguous float32 ``(N, *output_shape)`` array; a
        loop over many batches reuses one buffer. Dropout is off; safe to call
        from any thread. The outputs are those ``forward`` gives, bit for bit.
        """
        self._check_network_input(x, "infer_into")
        shape = (x.shape[0], *self.output_shape)
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
                and out.flags.c_contiguous and out.flags.writeable):
            got = f"{out.dtype} {_fmt(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"infer_into needs a writable contiguous float32 output of shape {_fmt(shape)}, "
                             f"got {got}")
        self._infer_checked(x, out)
        return out

    def _infer_checked(self, x: np.ndarray, y: np.ndarray) -> None:
        """y = the network on the checked x, on a scratch set of this call's own; small batches in one call."""
        scratch = self._checkout()
        try:
            self._infer_on(scratch, x, y, single=x.shape[0] < 2 * MIN_IMAGES_PER_THREAD)
        finally:
            self._checkin(scratch)

    def _checkout(self) -> Scratch:
        """A scratch set no other call is using: a spare one, or a new one when every spare is busy."""
        try:
            return self._spare.pop()  # (list.pop and append are atomic: no lock)
        except IndexError:
            return Scratch(self._ws_floats, self.threads, self._arena_floats, self._folded_floats, self._cache_floats)

    def _checkin(self, scratch: Scratch) -> None:
        if len(self._spare) < SPARE_SCRATCH:
            self._spare.append(scratch)

    def _folded(self, scratch: Scratch) -> int:
        """The address of the batchnorm coefficients inference reads besides the trained parameters (0 without
        batchnorm), folded now from the parameters and running statistics as they are: whatever wrote them
        (an update, a load, a write into a view), this call sees it. A few floats per channel, not the weights."""
        if self._fold is None:
            return 0
        self._fold(self._params_ptr, self.flat_state.ctypes.data, scratch.folded_ptr, 0, 1)
        return scratch.folded_ptr

    def _infer_on(self, scratch: Scratch, x: np.ndarray, y: np.ndarray, single: bool) -> None:
        n = x.shape[0]
        arena = scratch.arena("infer", min(n, CHUNK))
        params, folded, ws = self._params_ptr, self._folded(scratch), scratch.ws_ptrs
        xp, yp = x.ctypes.data, y.ctypes.data
        if single and self._infer_split is not None:
            shared, start = self.split_choice.shared(), time.perf_counter()
            if shared:
                bar, run, pool = scratch.barrier_ptr, self._infer_split, shared_pool(self.threads)
                if self._split_handoff is not None:
                    call, serve = self._split_handoff
                    start += pool.run_served(self._lib, lambda blk, seq: call(blk, seq, params, folded, arena, xp,
                                                                              yp, ws[0], ws[1], bar, 0, n), serve)
                else:
                    pool.run([lambda t=t: run(params, folded, arena, xp, yp, ws[t], bar, t, 0, n)
                              for t in range(self._split_parts)])
            else:
                self._infer(params, folded, arena, xp, yp, ws[0], 0, n)
            self.split_choice.record(shared, (time.perf_counter() - start) / n)
            return
        if single:
            self._infer(params, folded, arena, xp, yp, ws[0], 0, n)
            return
        if self._infer_claim is not None and self.threads > 1:
            self._claimed(scratch, folded, arena, x, y)
            return
        in_bytes, out_bytes = x[0].nbytes, y[0].nbytes
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            xs, ys = xp + start * in_bytes, yp + start * out_bytes

            def task(t: int, a: int, b: int, xs=xs, ys=ys) -> None:
                for lo in range(a, b, INFER_RUN):
                    self._infer(params, folded, arena, xs, ys, ws[t], lo, min(b, lo + INFER_RUN))

            self._parallel(stop - start, task)

    def _claimed(self, scratch: Scratch, folded: int, arena: int, x: np.ndarray, y: np.ndarray) -> None:
        """y = the network on x by ``infer_claim``: every pool thread on the whole batch, each taking the next
        image (near the end, the next band of an image's rows) from the scratch's counter until none is left."""
        params, ws, counter, claim = self._params_ptr, scratch.ws_ptrs, scratch.counter, self._infer_claim
        xp, yp, n, at = x.ctypes.data, y.ctypes.data, x.shape[0], scratch.counter_ptr
        counter[0] = 0
        shared_pool(self.threads).run([lambda t=t: claim(params, folded, arena, xp, yp, ws[t], at, 0, n)
                                       for t in range(self.threads)])

    def _parallel(self, n: int, task, grain: int = MIN_IMAGES_PER_THREAD) -> tuple[tuple[int, int], ...]:
        """Run ``task(thread, n0, n1)`` over [0, n) split across the shared pool's threads (one batch at a time)."""
        ranges = _thread_ranges(n, self.threads, grain)
        if len(ranges) == 1:
            task(0, 0, n)
            return ranges
        shared_pool(self.threads).run([lambda t=t, a=a, b=b: task(t, a, b) for t, (a, b) in enumerate(ranges)])
        return ranges

    def predict(self, x: Any) -> np.ndarray:
        """The most likely class of each image."""
        return self.forward(x).reshape(len(x), -1).argmax(axis=1)

    def loss_name(self, loss: str | None) -> str:
        loss = loss or self.manifest["train"].get("loss", DEFAULT_LOSS)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose {choices()}")
        return loss

    def gradients(self, x: np.ndarray, targets: np.ndarray, loss: str, *, seed: int = 0,
                  out: np.ndarray | None = None, losses: np.ndarray | None = None,
                  prepare: Callable[[int, int, int], None] | None = None, label_smoothing: float = 0.0,
                  image0: int = 0, whole: int | None = None) -> float:
        """One training step's gradient on a batch: ``flat_grads`` = d(mean loss)/d(params); returns the mean loss.

        The forward pass runs in training mode: dropout is on, its masks drawn
        from `seed`. `x` is a contiguous float32 ``(N, *input_shape)`` batch
        (the network's input: ``prepare`` makes one, ``batch_buffer`` one to fill) and
        `targets` what ``check_targets`` gives for its N images. `out` ((N, K)
        float32) and `losses` ((N,) float32), when given, receive the loss
        layer's inputs and each image's loss. ``prepare(thread, a, b)``, when
        given, first fills images [a, b) of `x`, on the pool thread that then
        runs them: the batch is gathered, converted (and augmented and
        jittered, see ``augment`` and ``add_noise``) on every core, and stays
        in that core's cache. `label_smoothing` e: cross-entropy against
        (1 - e) onehot + e / K, as PyTorch's ``cross_entropy(label_smoothing=e)``.

        A part of a larger batch (a process's share of a data-parallel step,
        ``cnnc_runtime.distributed``): `image0` is the index of ``x[0]`` in the
        whole batch, whose dropout masks follow each image's index there, and
        `whole` the whole batch's image count, by which the sums are divided
        instead of N, so that the parts' gradients and losses add up to the
        whole batch's.

        The batch is cut into shards by its size alone (see ``shards``); each
        shard's gradient sums into a buffer of its own and the buffers are added
        in order, so the result is the same bits on any number of threads. A part
        is cut as its whole batch is (``part_shards``), so that N ranks compute
        what one process would; but a part that this cuts into one piece only is
        cut by its own size when the model has several threads, so they share
        it (a rank's bits then differ between one thread and several, within
        float32 rounding). With batchnorm the step runs in phases, the batch
        statistics reduced across the shards between them
        (``cnnc_runtime.batchnorm``), the running statistics updated, and the
        batch is never cut into chunks.
        Calls take turns under ``lock``; hold ``lock`` around this call and the
        update that uses ``flat_grads`` (``update``), or another thread's step
        may overwrite the gradient in between.
        """
        self._check_network_input(x, "gradients", writable=prepare is not None)
        n, k = self._check_step(x, targets, loss)
        check_smoothing(label_smoothing, loss)
        out = self._step_buffer(out, (n, k), "out")
        losses = self._step_buffer(losses, (n,), "losses")
        whole = n if whole is None else whole
        if not (isinstance(image0, int) and isinstance(whole, int) and image0 >= 0 and image0 + n <= whole):
            raise ValueError(f"gradients on a part of a batch needs image0 >= 0 and image0 + N <= whole (N = {n}), "
                             f"got image0 {image0!r}, whole {whole!r}")
        scale = LOSSES[loss].scale(whole, k)  # the mean over the whole batch's images (mse: and outputs)
        with self.lock:  # (each shard's run zeroes its gradient buffer first, flat_grads in the first chunk)
            # batchnorm normalizes with the whole batch's statistics: one chunk, however large
            chunk = CHUNK if self.statistics is None else n
            if self.statistics is not None:
                self.statistics.check_batch(whole if self.statistics.reducer.spans_whole_batch else n)
                self.batches_tracked += 1
            whole_chunk = CHUNK if self.statistics is None else whole  # as one process runs the whole batch
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                parts = part_shards(start, stop, image0, whole, whole_chunk)
                if len(parts) < MIN_SHARDS and self.threads > 1:  # a part in one piece would leave threads idle
                    parts = shards(stop - start)
                self._chunk_gradients(x, targets, loss, seed, scale, out, losses, prepare, start, stop,
                                      label_smoothing, image0, parts)
        return float(losses.sum(dtype=np.float64) * scale)

    def _check_network_input(self, x: Any, what: str, writable: bool = False) -> None:
        """ValueError unless `x` is the network's input as native code takes it (what ``prepare`` returns)."""
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == len(self.input_shape) + 1
                and x.shape[1:] == self.input_shape and x.shape[0] >= 1 and x.flags.c_contiguous
                and (x.flags.writeable or not writable)):
            got = f"{x.dtype} {_fmt(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
            need = "a writable" if writable else "a"
            raise ValueError(f"{what} needs {need} contiguous float32 batch of shape {_fmt(('N', *self.input_shape))} "
                             f"(the network's input: see prepare), got {got}")

    def _check_step(self, x: np.ndarray, targets: Any, loss: str) -> tuple[int, int]:
        """(N, K) of a step's batch, or ValueError: the checks cost no pass over the data but the labels' range
        (one reduction over N labels)."""
        if loss not in self._steps:
            raise ValueError(f"unknown loss {loss!r}; choose {choices()}")
        n, k = x.shape[0], self.manifest["loss_inputs"][loss]
        labels = LOSSES[loss].labels
        want = ((n,), np.int32) if labels else ((n, k), np.float32)
        ok = (isinstance(targets, np.ndarray) and targets.shape == want[0] and targets.dtype == want[1]
              and targets.flags.c_contiguous)
        if ok and labels:
            ok = int(targets.view(np.uint32).max()) < k  # (a negative label is a huge uint32)
        if not ok:
            need = f"int32 labels of shape ({n},) in 0..{k - 1}" if labels else \
                f"float32 targets of shape {_fmt((n, k))}"
            raise ValueError(f"gradients needs {loss} targets as check_targets gives them: {need}")
        return n, k

    @staticmethod
    def _step_buffer(buf: np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
        if buf is None:
            return np.empty(shape, dtype=np.float32)
        if not (isinstance(buf, np.ndarray) and buf.dtype == np.float32 and buf.shape == shape
                and buf.flags.c_contiguous and buf.flags.writeable):
            raise ValueError(f"gradients needs `{what}` as a writable contiguous float32 array of shape {_fmt(shape)}")
        return buf

    def _chunk_gradients(self, x: np.ndarray, targets: np.ndarray, loss: str, seed: int, scale: float,
                         out: np.ndarray, losses: np.ndarray, prepare: Callable[[int, int, int], None] | None,
                         start: int, stop: int, smoothing: float, image0: int,
                         parts: tuple[tuple[int, int], ...]) -> None:
        """Images [start, stop) of one step's batch (at most a chunk): their shards `parts` (from `start`) on the
        pool, then the sum."""
        scratch = self._train_scratch
        arena = scratch.arena("train", stop - start)
        phases, params, ws = self._steps[loss], self._params_ptr, scratch.ws_ptrs
        stats = self.statistics
        stat_ptrs = stats.shard_buffers(len(parts)) if stats is not None else [0] * len(parts)
        coefs = stats.coefs_ptr if stats is not None else 0
        xs = x.ctypes.data + start * x[0].nbytes
        os_ = out.ctypes.data + start * out[0].nbytes
        ts = targets.ctypes.data + start * targets[0].nbytes
        ls = losses.ctypes.data + start * 4
        salt, first = seed % (1 << 63), image0 + start  # the dropout hash counts images of the whole batch
        grad_bytes = self.flat_grads.nbytes

        def run(t: int, i: int, grads: int, phase: int = 0) -> None:
            a, b = parts[i]
            if phase == 0:
                if i or not start:  # on the thread that fills it, without the GIL
                    ctypes.memset(grads, 0, grad_bytes)
                if prepare is not None:
                    prepare(t, start + a, start + b)
            phases[phase](params, grads, arena, xs, os_, ts, ls, ws[t], stat_ptrs[i], coefs, salt, first, scale,
                          smoothing, a, b)

        if len(phases) > 1:
            native = self._phased_steps.get(loss)
            if native is not None and type(stats.reducer) is Reducer:  # (a rank's reducer is Python's)
                values = {"params": params, "arena": arena, "x": xs, "out": os_, "targets": ts, "losses": ls,
                          "coefs": coefs, "seed": salt, "image0": first, "scale": f32_bits(scale),
                          "smooth": f32_bits(smoothing)}
                self._phased_native(native, parts, prepare, start, values)
            else:
                self._phased(loss, parts, run)
            return
        if self.threads == 1 or len(parts) == 1:  # in order on this thread: one spare buffer, each shard added at once
            bufs, ptrs = self._shard_buffers(min(len(parts), 2))
            for i in range(len(parts)):
                run(0, i, ptrs[min(i, 1)])
                if i:
                    np.add(self.flat_grads, bufs[1], out=self.flat_grads)
            return
        bufs, ptrs = self._shard_buffers(len(parts))

        def task(t: int, first: int, last: int) -> None:
            for i in range(first, last):
                run(t, i, ptrs[i])

        self._parallel(len(parts), task, grain=1)
        for g in bufs[1:len(parts)]:  # in shard order, as above
            np.add(self.flat_grads, g, out=self.flat_grads)

    def _phased_native(self, fn: Any, parts: tuple[tuple[int, int], ...],
                       prepare: Callable[[int, int, int], None] | None, start: int, values: dict[str, int]) -> None:
        """A step with batchnorm in one native call per thread (``cnnc.codegen.bnphases``): each pool thread zeroes
        its shards' gradient buffers and prepares their images, then runs every phase on them, thread 0 the
        reductions between phases, all meeting at barriers. Same bits as ``_phased``."""
        stats = self.statistics
        _, ptrs = self._shard_buffers(len(parts))
        per_thread = _thread_ranges(len(parts), self.threads, 1)
        keep = {"grads": np.array(ptrs[:len(parts)], dtype=np.int64),
                "stats": np.array(stats.shard_buffers(len(parts))[:len(parts)], dtype=np.int64),
                "ws": np.array(self._train_scratch.ws_ptrs, dtype=np.int64),
                "shard_ranges": np.array(parts, dtype=np.int64).reshape(-1),
                "thread_shards": np.array(per_thread, dtype=np.int64).reshape(-1)}
        ctx = np.zeros(len(PHASED_FIELDS), dtype=np.int64)
        for name, value in values.items():
            ctx[PHASED_FIELD[name]] = value
        for name, array in keep.items():
            ctx[PHASED_FIELD[name]] = array.ctypes.data
        self._phased_barrier[:] = 0
        ctx[PHASED_FIELD["shards"]], ctx[PHASED_FIELD["threads"]] = len(parts), len(per_thread)
        ctx[PHASED_FIELD["barrier"]] = self._phased_barrier.ctypes.data
        ctx[PHASED_FIELD["state"]] = self.flat_state.ctypes.data
        ctx[PHASED_FIELD["saved"]] = stats.saved.ctypes.data
        address, grad_bytes = ctx.ctypes.data, self.flat_grads.nbytes

        def task(t: int) -> None:
            try:
                for i in range(*per_thread[t]):
                    ctypes.memset(ptrs[i], 0, grad_bytes)
                    if prepare is not None:
                        prepare(t, start + parts[i][0], start + parts[i][1])
            except BaseException:
                ctx[PHASED_FIELD["failed"]] = 1  # (read after the first barrier: every thread returns there)
                fn(address, t)
                raise
            fn(address, t)

        if len(per_thread) == 1:
            task(0)
        else:
            shared_pool(self.threads).run([lambda t=t: task(t) for t in range(len(per_thread))])
        for g in self._shard_grads[1:len(parts)]:  # in shard order, as ``_phased``
            np.add(self.flat_grads, g, out=self.flat_grads)

    def _phased(self, loss: str, parts: list[tuple[int, int]], run: Callable[..., None]) -> None:
        """A step with batchnorm: each phase on every shard (on the pool), then the reduction that ends it
        (``cnnc_runtime.batchnorm``); every shard keeps its gradient buffer from the first phase to the last."""
        bufs, ptrs = self._shard_buffers(len(parts))
        syncs = self.statistics.phases[loss]
        for k in range(len(syncs) + 1):
            def task(t: int, first: int, last: int, k: int = k) -> None:
                for i in range(first, last):
                    run(t, i, ptrs[i], k)

            if self.threads == 1:
                task(0, 0, len(parts))
            else:
                self._parallel(len(parts), task, grain=1)
            if k < len(syncs):
                self._reduce(syncs[k], parts)
        for g in bufs[1:len(parts)]:  # in shard order
            np.add(self.flat_grads, g, out=self.flat_grads)

    def _reduce(self, sync: dict, parts: list[tuple[int, int]]) -> None:
        """The reduction at the end of a phase: a batchnorm's forward statistics or backward sums."""
        if sync["kind"] == "forward":
            self.statistics.forward(sync["layer"], parts, self.params, self.buffers)
        else:
            self.statistics.backward(sync["layer"], parts, self.params, self.grads)

    def _shard_buffers(self, count: int) -> tuple[list[np.ndarray], list[int]]:
        """Gradient buffers for `count` shards (the first is ``flat_grads``), made once and kept."""
        while len(self._shard_grads) < count:
            check_fits(4 * self.flat_grads.size, f"a gradient buffer of network {self.name}")
            g = aligned_zeros(self.flat_grads.size)
            self._shard_grads.append(g)
            self._shard_ptrs.append(g.ctypes.data)
        return self._shard_grads, self._shard_ptrs

    def native_update(self, optimizer) -> NativeUpdate | None:
        """This model's compiled loop for `optimizer`'s rule, for ``optimizer.use_native``; None if there is none.

        None too for a subclass of a built-in optimizer (its rule may differ),
        and when the code lists the rule's constants in another order.
        """
        kind = optimizer.native_kind
        listed = self.manifest.get("updates", {}).get(kind)
        if not kind or listed != list(optimizer.constant_names):
            return None
        if kind not in self._updates:
            fn = self._lib.function(f"update_{kind}", [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2)
            self._updates[kind] = NativeUpdate(fn, self._lib)
        return self._updates[kind]

    def add_noise(self, x: np.ndarray, sigma: float, seed: int, *, rows: tuple[int, int] | None = None,
                  thread: int | None = None, image0: int = 0) -> None:
        """x += N(0, sigma^2) noise, in place, drawn natively from `seed` (training's input jitter).

        `x` must be a writable contiguous float32 ``(N, *input_shape)`` array.
        Image i's noise depends on `seed` and i alone, so adding it a range at
        a time gives what adding it at once gives. `rows` (a, b): only images
        [a, b). `thread`: from a ``gradients`` ``prepare`` callback, the pool
        thread it runs on (the noise is then drawn in that step's workspace).
        `image0`: ``x`` is part of a larger batch, starting at its image
        `image0`; each image gets the noise of its index in that batch.
        """
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                and x.flags.writeable and x.shape[1:] == self.input_shape and x.ndim == len(self.input_shape) + 1):
            raise ValueError(f"add_noise needs a writable contiguous float32 array of shape "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        a, b = (0, x.shape[0]) if rows is None else rows
        if not 0 <= a <= b <= x.shape[0]:
            raise ValueError(f"add_noise rows {rows} are not a range of the {x.shape[0]} images")
        if not (isinstance(image0, int) and image0 >= 0):
            raise ValueError(f"add_noise image0 must be a non-negative index, got {image0!r}")
        if thread is not None:
            if not 0 <= thread < self.threads:
                raise ValueError(f"add_noise thread {thread} is not one of the model's {self.threads} pool threads")
            self._jitter(x.ctypes.data, seed % (1 << 63), image0, sigma, self._train_scratch.ws_ptrs[thread], a, b)
            return
        scratch = self._checkout()
        try:
            self._jitter(x.ctypes.data, seed % (1 << 63), image0, sigma, scratch.ws_ptrs[0], a, b)
        finally:
            self._checkin(scratch)

    def augment(self, x: np.ndarray, seed: int, pad: int = 0, flip: bool = False, fill: np.ndarray | float = 0.0, *,
                rows: tuple[int, int] | None = None, thread: int | None = None, image0: int = 0) -> None:
        """Crop each image after zero padding by `pad` and mirror it at random, in place, drawn natively from `seed`.

        Training's crop and flip. Image i's draws depend on `seed` and i alone
        (see ``cnnc.codegen.augment``), so augmenting a range at a time gives
        what augmenting at once gives. `fill` is what the padding holds, one
        value or one per channel (training pads with a black pixel after
        normalization, ``Inputs.blank``). `x` must be a writable contiguous
        float32 ``(N, C, H, W)`` array of the input's shape. `rows`, `thread`
        and `image0` as in ``add_noise``.
        """
        check_augment(pad, self.input_shape, bool(flip))
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous
                and x.flags.writeable and x.shape[1:] == self.input_shape):
            raise ValueError(f"augment needs a writable contiguous float32 array of shape "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        a, b = (0, x.shape[0]) if rows is None else rows
        if not 0 <= a <= b <= x.shape[0]:
            raise ValueError(f"augment rows {rows} are not a range of the {x.shape[0]} images")
        if not (isinstance(image0, int) and image0 >= 0):
            raise ValueError(f"augment image0 must be a non-negative index, got {image0!r}")
        fill = self.augment_fill(fill)
        args = (x.ctypes.data, seed % (1 << 63), image0, int(pad), int(bool(flip)), fill.ctypes.data)
        if thread is not None:
            if not 0 <= thread < self.threads:
                raise ValueError(f"augment thread {thread} is not one of the model's {self.threads} pool threads")
            self._augment(*args, self._train_scratch.ws_ptrs[thread], a, b)
            return
        scratch = self._checkout()
        try:
            self._augment(*args, scratch.ws_ptrs[0], a, b)
        finally:
            self._checkin(scratch)

    def gatherer(self, inputs: Inputs, out: np.ndarray) -> NativeGather | None:
        """A native gatherer of batches of `inputs` into `out` (a ``batch_buffer``); None where the code has none."""
        if self._gathers is None:
            return None
        inputs = self.inputs(inputs)
        if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
                and out.flags.writeable and out.shape[1:] == self.input_shape):
            raise ValueError(f"gatherer needs a writable contiguous float32 buffer of shape "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        return NativeGather(self._gathers, inputs, out, self._lib)

    @property
    def threads(self) -> int:
        """The pool threads this model runs on: fixed when it is made (its per-thread buffers are sized by it)."""
        return self._threads

    @property
    def has_runs(self) -> bool:
        """Whether this model's code runs whole runs of training steps natively (``cnnc_runtime.steploop``)."""
        return bool(self._runs)

    def loss_scale(self, loss: str, n: int) -> float:
        """What a step of `n` images multiplies its summed loss by (the mean's divisor)."""
        return LOSSES[loss].scale(n, self.manifest["loss_inputs"][loss])

    def run_layout(self, m: int, image0: int = 0, whole: int | None = None) -> tuple:
        """A run's arrays for steps of `m` images (at most CHUNK), as ``steploop.NativeRun`` passes them; in a
        rank of a data-parallel job, images [image0, image0 + m) of a batch of `whole`.

        (shards, their ranges, each thread's shards, each thread's slice of the parameters, the shards'
        gradient buffers, the workspaces): the shards as ``gradients`` cuts a batch, so the sums are the same
        bits. (The arena is not here: a step on another thread may grow it; ``run_steps`` reads it.)
        """
        whole = m if whole is None else whole
        if not (1 <= m <= CHUNK and 0 <= image0 and image0 + m <= whole):
            raise ValueError(f"a native run takes steps of 1 to {CHUNK} images (images [image0, image0 + m) of a "
                             f"batch of `whole`), got {m} images from {image0} of {whole}")
        parts = part_shards(0, m, image0, whole, CHUNK)
        if len(parts) < MIN_SHARDS and self.threads > 1:  # (as ``gradients`` cuts it)
            parts = shards(m)
        per_thread = _thread_ranges(len(parts), self.threads, 1)
        slices = split(self.flat_params.size, len(per_thread), PARAM_GRAIN)
        slices += [(self.flat_params.size,) * 2] * (len(per_thread) - len(slices))
        _, ptrs = self._shard_buffers(len(parts))  # (buffers are added, never moved)
        return (len(parts), np.array(parts, dtype=np.int64), np.array(per_thread, dtype=np.int64).reshape(-1),
                np.array(slices, dtype=np.int64).reshape(-1), np.array(ptrs[:len(parts)], dtype=np.int64),
                np.array(self._train_scratch.ws_ptrs, dtype=np.int64))

    def run_update(self, optimizer) -> tuple[int, tuple[int, ...]]:
        """(the index of `optimizer`'s native update in the code's table, the six pointers it is called with)."""
        kinds = sorted(self.manifest["updates"])  # (the run entry switches over them in this order)
        pointers = optimizer.native_buffers(self.flat_params, self.flat_grads, self.decay_mask)
        if self.native_update(optimizer) is None or pointers is None:
            raise ValueError(f"{type(optimizer).__name__} has no native update in network {self.name}'s code")
        return kinds.index(optimizer.native_kind), pointers

    def run_steps(self, loss: str, ctx: np.ndarray, threads: int, images: int) -> None:
        """Every one of `threads` pool threads runs ``run_LOSS(ctx, thread)`` (``cnnc_runtime.steploop``) on
        steps of `images` images, under ``lock``."""
        with self.lock:  # (the arena's address is read under it: a step on another thread may grow the arena)
            ctx[RUN_FIELD["arena"]] = self._train_scratch.arena("train", images)
            call_threads(self._runs[loss], ctx, threads, self.threads)

    def augment_fill(self, fill: np.ndarray | float) -> np.ndarray:
        """`fill` as one float32 per input channel (what ``augment`` pads with); ValueError for another count."""
        channels = self.input_shape[0] if len(self.input_shape) == 3 else 1
        values = np.asarray(fill, dtype=np.float32).reshape(-1)
        if values.size not in (1, channels):
            raise ValueError(f"augment fill has {values.size} values; the input has {channels} channel(s)")
        return np.ascontiguousarray(np.broadcast_to(values, (channels,)))

    def update(self, optimizer) -> None:
        """One optimizer step on the parameters with the gradient in ``flat_grads``, under ``lock``.

        The optimizer runs this model's compiled loop for its rule once bound to
        it (``optimizer.use_native(model.native_update(optimizer))``). A
        decoupled weight decay (AdamW's) applies where ``decay_mask`` is 1.
        """
        with self.lock:
            optimizer.step(self.flat_params, self.flat_grads, self.decay_mask)

    def value_and_grad(self, x: Any, y: Any, loss: str | None = None, seed: int = 0,
                       label_smoothing: float = 0.0) -> tuple[float, dict]:
        """The mean loss over the batch and its gradient for every parameter (same keys as ``params``).

        Cross-entropy is softmax followed by the negative log-likelihood of the
        integer labels (with `label_smoothing` e, of the target (1 - e) onehot + e / k,
        as PyTorch's ``cross_entropy(label_smoothing=e)``); mse is the mean of
        (o - y)^2 over all outputs, with integer labels taken as one-hot targets.
        Dropout is on, its masks drawn from `seed`. Frozen parameters get zero gradients.
        """
        loss = self.loss_name(loss)
        x = self.prepare(x)
        targets = self.check_targets(y, x.shape[0], loss)
        with self.lock:
            value = self.gradients(x, targets, loss, seed=seed, label_smoothing=label_smoothing)
            grads = {name: g.copy() for name, g in self.grads.items()}
        return value, grads

    @property
    def code(self) -> bytes:
        """The network's native object code, as an artifact stores it (ranks of an MPI job compare it)."""
        return self._obj

    def save_artifact(self, path: str | os.PathLike[str], with_weights: bool = True,
                      key: bytes | str | os.PathLike[str] | None = None) -> None:
        """Write this model (code, manifest and, by default, the current weights) as one artifact file.

        With a `key` (bytes, or a key file's path) the artifact is signed: ``load(path, key=...)`` checks it.
        """
        weights = b""
        if with_weights:
            buf = io.BytesIO()
            np.savez(buf, **self.state())
            weights = buf.getvalue()
        artifact.write(path, self.manifest, self._obj, weights, key)
