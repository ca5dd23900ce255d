"""Where a step's time goes: per layer forward and backward, the optimizer, the data, the reductions, the rest.

A profiling build of a network (``cnnc.codegen.instrument``) counts, in
native code, the CPU's cycle counter over each region (a layer's forward or
backward, the loss), summed over the threads. A
``ProfiledModel`` runs that build as any ``Model`` and also times, with the
wall clock, what happens outside native code: every native call (per
thread), the optimizer update, the preparation of each batch (gathering,
converting, augmenting, on the pool's threads), batchnorm's reductions
between phases, the preparation of inference inputs.

``profile_training`` runs ``fit`` for a number of steps (the train section's
recipe: optimizer, augmentation, weight decay) and ``profile_inference`` calls
the model on a batch repeatedly. The cycle counter is converted to seconds by
its rate over the same run, read against the wall clock. In the result:

- a layer's time is the cycles of its region summed over threads, divided
  by the number of threads that ran that code (the threads share each
  layer, so this is the wall time it takes); GFLOP/s counts 2 x the direct
  product's multiply-adds (``Region.flops``), as a share of the FMA peak of
  those threads (``cnnc_runtime.peak``);
- the data preparation is shared by the threads as the layers are; the
  optimizer, batchnorm's reductions (training) and batchnorm's folding
  (inference: one native call, timed around it) run on the calling thread alone;
  in a native run of steps (``cnnc_runtime.steploop``) the data preparation,
  the optimizer and the threads' waits at its barriers are regions of the
  step's entry, shared by the threads as the layers are; so are, in a step
  with batchnorm run in one native call per thread (``cnnc.codegen.bnphases``),
  the waits and the reductions (thread 0's, while the others wait);
- the overhead is what remains of the step's measured time (Python between
  native calls, summing the gradient shards, waiting for the slowest thread,
  the training loop's checks and bookkeeping).

``native`` in the result checks the instrumentation: the regions' seconds
of every native call, and the same calls timed from Python around them. The
two are different clocks over the same intervals and agree within the cost
of a ctypes call when every region is counted and the rate is right.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnc_runtime.data import check_fits_in_memory
from cnnc_runtime.host import cpu_model
from cnnc_runtime.model import Model
from cnnc_runtime.optimizers import optimizer_class
from cnnc_runtime.settings import settings_from
from cnnc_runtime.train import TrainingStopped

MIN_CALIBRATION = 0.05  # seconds of wall clock the cycle counter's rate is read over, at least
# A recipe whose loss turns non-finite on random data (no batchnorm, a large step) is timed again from fresh
# weights at its learning rate times CALMER, up to CALM_TRIES times: a step's work does not depend on the rate.
CALMER = 1e-3
CALM_TRIES = 3
RUN_PARTS = ("prepare", "update", "reduce")  # regions of a native call's own work shown as the step's other parts


@dataclass(frozen=True)
class Line:
    """One line of a profile: a layer's forward or backward (or the loss), or one of the step's other parts."""

    name: str  # the layer, or the part ("optimizer", "data preparation", ...)
    op: str  # the layer's op ("conv+relu"); "" for the other parts
    phase: str  # "forward", "backward", "loss", "output", or "other"
    seconds: float  # per step
    share: float  # of the step's measured time
    flops: float = 0.0  # per step
    gflops: float | None = None
    peak_share: float | None = None  # of the FMA peak of the threads that ran it


@dataclass
class Profile:
    """A profile of one network: per-step figures, ``lines`` summing to ``step_seconds``."""

    network: str
    mode: str  # "train" or "infer"
    batch: int
    steps: int  # steps (or inference calls) measured
    threads: int
    step_seconds: float
    peak_gflops: dict[int, float]  # per thread count
    cpu: str  # its model name (LLVM's name for it)
    lines: list[Line]
    native: dict[str, float]  # "counted" (the regions' seconds) and "timed" (from Python), summed over calls
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_gflops"] = {str(k): v for k, v in self.peak_gflops.items()}
        return d


def check_profile_manifest(manifest: dict) -> list[dict]:
    """The regions of a profiling build's manifest; ValueError for anything else."""
    prof = manifest.get("profile")
    triple = manifest.get("target", {}).get("triple", "") if isinstance(manifest.get("target"), dict) else ""
    if not str(triple).startswith(("x86_64", "i386", "i686")):  # (elsewhere LLVM's cycle counter may trap)
        raise ValueError(f"profiling reads the x86 timestamp counter; this code is for {triple or 'another CPU'}")
    regions = prof.get("regions") if isinstance(prof, dict) else None
    ok = isinstance(regions, list) and all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("entry", "phase", "layer", "op"))
        and isinstance(r.get("flops"), int) and r["flops"] >= 0 for r in regions)
    if not ok or prof.get("clock") != "readcyclecounter":
        raise ValueError("not a profiling build of the network (compile it with profile=True)")
    return regions


class Timers:
    """What a ``ProfiledModel`` times from Python since the last reset: each native call per (entry, thread), and
    named parts (held apart from the model, so that the wrappers make no reference cycle through it)."""

    def __init__(self) -> None:
        self.native: dict[tuple[str, int], list[float]] = {}  # (entry, thread) -> [seconds, calls]
        self.parts: dict[str, float] = {}
        self._lock = threading.Lock()  # (parts timed on several pool threads at once add into one number)

    def reset(self) -> None:
        self.native.clear()
        self.parts = {"optimizer": 0.0, "reductions": 0.0, "prepare": 0.0, "inputs": 0.0}

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.parts[part] += seconds

    def native_call(self, entry: str, fn: Callable) -> Callable:
        """`fn` (a native entry point), timed per call on the thread that calls it."""
        native = self.native

        def call(*args: Any) -> None:
            t = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t
            record = native.setdefault((entry, threading.get_ident()), [0.0, 0])  # (this thread's own record)
            record[0] += dt
            record[1] += 1

        return call

    def part(self, part: str, fn: Callable) -> Callable:
        """`fn`, its time added to `part`."""
        def call(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - t)

        return call

    def threads_of(self, entry: str) -> int:
        """How many threads ran `entry` (at least 1)."""
        return max(1, len({t for e, t in self.native if e == entry}))

    def seconds_in(self, entries: tuple[str, ...]) -> float:
        """The native calls of `entries`, timed from Python, summed over calls and threads."""
        return sum(v[0] for (e, _), v in self.native.items() if e in entries)


class ProfiledModel(Model):
    """A ``Model`` of a profiling build that also times, from Python, what it does outside native code.

    It wraps the Engine's native entry points (its private ``_infer``,
    ``_infer_split``, ``_fold`` and ``_steps``) with timers; a change there fails the profiler's tests.
    """

    def __init__(self, manifest: dict[str, Any], obj: bytes, weights: bytes = b"", seed: int | None = None,
                 threads: int | None = None) -> None:
        self.regions = check_profile_manifest(manifest)
        self.timers = Timers()
        super().__init__(manifest, obj, weights, seed, threads)
        self._clock = self._lib.function("profile_clock", [ctypes.c_void_p])
        self._take = self._lib.function("profile_take", [ctypes.c_void_p])
        self._tick = np.zeros(1, dtype=np.int64)
        self.reset()
        t = self.timers
        self._infer = t.native_call("infer", self._infer)
        if self._infer_split is not None:  # (one image on several threads: cnnc.codegen.split)
            self._infer_split = t.native_call("infer_split", self._infer_split)
            self._split_handoff = None  # (each share a call through the pool, timed from Python as above)
        if self._fold is not None:
            self._fold = t.native_call("fold", self._fold)
        self._steps = {loss: [t.native_call(f"step_{loss}", fn) for fn in fns] for loss, fns in self._steps.items()}
        # a native run of steps counts as the step's entry: its threads run the step, and its own work is
        # regions of that entry (the data's preparation, the optimizer, the barriers: cnnc.codegen.runloop)
        self._runs = {loss: t.native_call(f"step_{loss}", fn) for loss, fn in self._runs.items()}
        # so is a step with batchnorm in one call per thread (cnnc.codegen.bnphases), its reductions a region
        self._phased_steps = {loss: t.native_call(f"step_{loss}", fn) for loss, fn in self._phased_steps.items()}
        if self.statistics is not None:  # batchnorm's reductions between phases, on the calling thread
            self.statistics.forward = t.part("reductions", self.statistics.forward)
            self.statistics.backward = t.part("reductions", self.statistics.backward)

    def reset(self) -> None:
        """Zero the counters and the timers."""
        self.take()
        self.timers.reset()

    def clock(self) -> int:
        """The cycle counter now (what the regions count)."""
        self._clock(self._tick.ctypes.data)
        return int(self._tick[0])

    def take(self) -> np.ndarray:
        """The regions' cycles since the last take (summed over threads), in ``regions`` order; zeroes them."""
        out = np.zeros(max(len(self.regions), 1), dtype=np.int64)
        self._take(out.ctypes.data)
        return out[:len(self.regions)]

    def update(self, optimizer) -> None:
        t = time.perf_counter()
        super().update(optimizer)
        self.timers.add("optimizer", time.perf_counter() - t)

    def prepare(self, x: Any) -> np.ndarray:
        t = time.perf_counter()
        try:
            return super().prepare(x)
        finally:
            self.timers.add("inputs", time.perf_counter() - t)

    def gradients(self, x: np.ndarray, targets: np.ndarray, loss: str, *,
                  prepare: Callable[[int, int, int], None] | None = None, **kwargs: Any) -> float:
        if prepare is not None:  # the batch's gathering and preparation, on the pool's threads (summed)
            prepare = self.timers.part("prepare", prepare)
        return super().gradients(x, targets, loss, prepare=prepare, **kwargs)


def random_inputs(model: Model, n: int, seed: int = 0, dataset: bool = True) -> np.ndarray:
    """`n` random inputs of the network's shape: uint8 as a dataset keeps images (`dataset`), else float32."""
    rng = np.random.default_rng(seed)
    shape = (n, *model.input_shape)
    check_fits_in_memory(shape, np.uint8 if dataset else np.float32, "random inputs")
    if dataset:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape, dtype=np.float32)


def random_targets(model: Model, n: int, loss: str, seed: int = 0) -> np.ndarray:
    """`n` random class labels for the outputs `loss` reads (mse takes them as one-hot targets)."""
    return np.random.default_rng(seed).integers(0, model.manifest["loss_inputs"][loss], n)


def _run(model: ProfiledModel, work: Callable[[], None]) -> tuple[np.ndarray, float, float]:
    """(cycles per region, the counter's rate in cycles per second, wall seconds) of `work`."""
    model.reset()
    t0, c0 = time.perf_counter(), model.clock()
    work()
    t1 = time.perf_counter()
    counters = model.take()
    while time.perf_counter() - t0 < MIN_CALIBRATION:  # a short run: read the rate over a little more time
        time.sleep(MIN_CALIBRATION / 5)
    t2, c2 = time.perf_counter(), model.clock()
    if c2 <= c0:
        raise RuntimeError("the CPU's cycle counter did not advance; cannot profile on this machine")
    return counters, (c2 - c0) / (t2 - t0), t1 - t0


def profile_training(model: ProfiledModel, peak, batch: int | None = None, steps: int = 20, warmup: int = 3,
                     seed: int = 0) -> Profile:
    """`steps` training steps of ``fit`` (the train section's recipe) on random data, at `batch` (default: the
    train section's); `peak` is a ``cnnc_runtime.peak.Peak``."""
    settings = dict(epochs=1, validation=0.0, progress=False, restarts=1, patience=None, max_steps=None,
                    min_improvement=None)
    if batch is not None:
        settings["batch"] = batch
    batch = batch or int(model.manifest["train"].get("batch", 64))
    loss = model.loss_name(None)
    x = random_inputs(model, batch * max(steps, warmup), seed)
    y = random_targets(model, len(x), loss, seed)
    recipe = settings_from(model.manifest["train"])
    lr = recipe.lr if recipe.lr is not None else optimizer_class(recipe.optimizer).defaults["lr"]
    calmed = []
    box: dict[str, Any] = {}

    def work() -> None:
        box["history"] = model.fit(x[:batch * steps], y[:batch * steps], seed=seed + 1, **settings)

    for tries in range(CALM_TRIES + 1):
        try:
            model.fit(x[:batch * warmup], y[:batch * warmup], seed=seed, **settings)  # warm-up: buffers, caches
            counters, rate, _ = _run(model, work)
            break
        except TrainingStopped as e:
            if tries == CALM_TRIES:
                raise ValueError(f"cannot profile training: on random data the loss stays non-finite even at "
                                 f"learning rate {settings['lr']:g} ({e})") from None
            calmed.append(f"{settings.get('lr', lr):g}")
            settings["lr"] = settings.get("lr", lr) * CALMER
            model.initialize(int(model.manifest["train"].get("seed", 0)))
    epoch = box["history"].epochs[-1]
    step = epoch.seconds / epoch.steps
    entry = f"step_{loss}"
    lines = _region_lines(model, counters, rate, [entry], epoch.steps, step, batch, peak)
    native = {line.phase: line.seconds for line in lines if line.phase in RUN_PARTS}  # (a native run's own work)
    lines = [line for line in lines if line.phase not in RUN_PARTS]
    t = model.timers.threads_of(entry)
    timers = model.timers.parts
    n = epoch.steps
    others = [("data preparation", timers["prepare"] / t / n + native.get("prepare", 0.0)),
              ("optimizer", timers["optimizer"] / n + native.get("update", 0.0)),
              ("batchnorm reductions", timers["reductions"] / n + native.get("reduce", 0.0))]
    notes = [f"random uint8 inputs of shape {model.input_shape} prepared per batch as a dataset's (the train "
             f"section's normalize and augmentation), random labels; loss {loss}",
             *_common_notes(model, [entry])]
    if calmed:
        notes.append(f"the train section's learning rate {calmed[0]} made the loss of random data non-finite "
                     f"(tried: {', '.join(calmed)}): timed at {settings['lr']:g}, from fresh weights (a step's "
                     "work does not depend on the rate)")
    return _finish(model, "train", batch, epoch.steps, step, lines, others, counters, rate, [entry], peak, notes)


def profile_inference(model: ProfiledModel, peak, batch: int = 1, calls: int | None = None,
                      seed: int = 0) -> Profile:
    """`calls` calls of ``model(x)`` on a random float32 batch of `batch` images (default: enough calls for
    about 0.3 s, at least 10)."""
    x = random_inputs(model, batch, seed, dataset=False)
    model(x)
    t = time.perf_counter()
    model(x)
    once = max(time.perf_counter() - t, 1e-6)
    calls = calls or int(min(max(10, 0.3 / once), 10_000))

    def work() -> None:
        for _ in range(calls):
            model(x)

    counters, rate, wall = _run(model, work)
    step = wall / calls
    entries = ["infer", "infer_split"]  # (a small batch runs on one thread or, split, on all: whichever is faster)
    lines = _region_lines(model, counters, rate, entries, calls, step, batch, peak)
    others = [("input preparation", model.timers.parts["inputs"] / calls),
              ("batchnorm folding", model.timers.seconds_in(("fold",)) / calls)]  # (one native call, timed around)
    notes = ["random float32 inputs of shape " + str((batch, *model.input_shape)) + " (model(x): prepared by the "
             "input rule, then the inference pass)", *_common_notes(model, entries)]
    return _finish(model, "infer", batch, calls, step, lines, others, counters, rate, entries, peak, notes)


def _common_notes(model: ProfiledModel, entries: list[str]) -> list[str]:
    ran = sorted({model.timers.threads_of(e) for e in entries if model.timers.seconds_in((e,)) > 0}) or [1]
    threads = " or ".join(map(str, ran))
    return [f"layer times: the cycles of each layer's code on all threads / the threads that ran it ({threads}); "
            "GFLOP/s: 2 x the direct convolution's or dense product's multiply-adds per second (a backward counts "
            "one product per gradient it computes: the weights', the input's), so a Winograd layer can pass the "
            "peak"]


def _region_lines(model: ProfiledModel, counters: np.ndarray, rate: float, entries: list[str], steps: int,
                  step: float, images: int, peak) -> list[Line]:
    """The regions of `entries` as lines per step of `images` images, in the order the code runs them; the input
    layer (no code) left out. A layer in several entries (``infer`` and ``infer_split``) is one line: the sum of
    its times there, each its cycles / the threads that ran that entry; its peak, that of the most threads."""
    merged: dict[tuple[str, str], list] = {}  # (phase, layer) -> [region, seconds, threads]
    for r, cycles in zip(model.regions, counters):
        if r["entry"] not in entries or r["op"] == "input":
            continue
        threads = model.timers.threads_of(r["entry"])
        line = merged.setdefault((r["phase"], r["layer"]), [r, 0.0, 1])
        line[1] += float(cycles) / rate / threads / steps
        if cycles:
            line[2] = max(line[2], threads)
    lines = []
    for r, seconds, threads in merged.values():
        flops = float(r["flops"]) * images
        gflops = flops / seconds / 1e9 if seconds > 0 and flops else None
        lines.append(Line(r["layer"], r["op"], r["phase"], seconds, seconds / step, flops, gflops,
                          gflops / peak.gflops(threads) if gflops is not None else None))
    return lines


def _finish(model: ProfiledModel, mode: str, batch: int, steps: int, step: float, lines: list[Line],
            others: list[tuple[str, float]], counters: np.ndarray, rate: float, entries: list[str], peak,
            notes: list[str]) -> Profile:
    lines = list(lines)
    for name, seconds in others:
        if seconds > 0:
            lines.append(Line(name, "", "other", seconds, seconds / step))
    rest = step - sum(line.seconds for line in lines)
    lines.append(Line("overhead (the rest)", "", "other", rest, rest / step))
    counted = sum(float(c) for r, c in zip(model.regions, counters) if r["entry"] in entries) / rate
    timed = model.timers.seconds_in(tuple(entries))
    return Profile(model.name, mode, batch, steps, model.threads, step,
                   {t: peak.gflops(t) for t in sorted({1, model.threads})}, f"{cpu_model()} ({peak.cpu})", lines,
                   {"counted": counted, "timed": timed}, notes)


__all__ = ["Line", "Profile", "ProfiledModel", "Timers", "check_profile_manifest", "profile_inference",
           "profile_training", "random_inputs", "random_targets"]
