"""The training loop: shuffled mini-batches, validation, early stopping, restarts, checkpoints.

It sits on the engine's public step API (``cnnc_runtime.engine``) and is
imported by ``cnnc_runtime.model``, never the other way round.

Steps run natively in runs (``cnnc_runtime.steploop``): one native call per
pool thread does a run of steps (gather, augment, forward, loss, backward,
the gradient's sum, L2, the checks and the optimizer), and Python takes over
between runs (an epoch's end, the progress bar, a possible Ctrl-C, the step
limit). Where runs do not apply (``steploop.unsupported``: batchnorm,
gradient clipping, an optimizer without a native update) one step is one
native call per thread (``step_LOSS``) and a handful of numpy expressions over
the flat buffers; both give the same weights bit for bit. Everything random (weight
initialisation, shuffling, jitter, dropout masks) comes from the seed, so a
run is reproducible, and a run resumed from a checkpoint continues exactly as
if it had never stopped.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnc_runtime.distributed import Local, RankReducer, abort_on_failure, check_same, fingerprint, share, world
from cnnc_runtime.engine import CHUNK, Engine, check_augment, check_smoothing
from cnnc_runtime.fileio import atomic_save_npz
from cnnc_runtime.inputs import Inputs, first_non_finite_row
from cnnc_runtime.losses import LOSSES
from cnnc_runtime.optimizers import add_weight_decay, clip_grad_norm
from cnnc_runtime.progress import ProgressBar
from cnnc_runtime.schedule import make_schedule
from cnnc_runtime.settings import OPTIONAL, Settings, new_optimizer, renamed, settings_from
from cnnc_runtime.steploop import SEEDS, TALLY, NativeRun, run_length, unsupported

EVAL_BATCH = CHUNK


class TrainingStopped(Exception):
    """Training cannot go on (a NaN or infinite loss, gradient or weight); the model keeps the last good weights."""


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C acted on between two steps, by every rank at the same step (the state saved is consistent)."""


@dataclass
class Epoch:
    """What one epoch measured."""

    epoch: int
    loss: float
    accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    images_per_second: float
    steps: int
    restart: int = 0
    lr: float | None = None  # the learning rate of the epoch's last step


@dataclass
class History:
    """Per-epoch records of the kept run, each restart's outcome, and why training stopped."""

    epochs: list[Epoch] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    stopped: str = ""
    best_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": [asdict(e) for e in self.epochs], "restarts": self.restarts, "stopped": self.stopped,
                "best_epoch": self.best_epoch}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> History:
        return History([Epoch(**e) for e in d["epochs"]], d["restarts"], d["stopped"], d["best_epoch"])


def _labels_like(model: Engine, y: np.ndarray, loss: str) -> bool:
    return LOSSES[loss].labels or np.asarray(y).dtype.kind in "iub"


def evaluate(model: Engine, x: np.ndarray | Inputs, y: np.ndarray,
             loss: str | None = None) -> tuple[float, float | None, np.ndarray]:
    """(mean loss, accuracy or None, predictions) of the inference network (dropout off) on a whole set.

    Images are prepared EVAL_BATCH at a time (see ``Model.inputs``), never all at once. Inputs or mse
    targets holding NaN or infinity are refused (ValueError naming the first), as in ``fit``.
    """
    loss = model.loss_name(loss)
    inputs = model.inputs(x)
    targets = model.check_targets(y, len(inputs), loss)
    _refuse_non_finite(inputs, targets)
    return _evaluate(model, inputs, y, targets, loss)


def _evaluate(model: Engine, inputs: Inputs, y: np.ndarray, targets: np.ndarray,
              loss: str) -> tuple[float, float | None, np.ndarray]:
    """`evaluate` on a set already checked (fit's validation set, checked once before its first epoch)."""
    n = len(inputs)
    out = _infer_all(model, inputs).reshape(n, -1).astype(np.float64)
    if loss == "cross_entropy":
        if model.manifest["output"]["op"] == "softmax":
            logp = np.log(np.maximum(out, 1e-30))
        else:
            shifted = out - out.max(axis=1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        value = float(-logp[np.arange(n), targets].mean())
    else:
        value = float(((out - targets) ** 2).mean())
    pred = out.argmax(axis=1)
    acc = float((pred == np.asarray(y)).mean()) if _labels_like(model, y, loss) else None
    return value, acc, pred


def _refuse_non_finite(inputs: Inputs, targets: np.ndarray, what: str = "") -> None:
    """ValueError naming the first input (or mse target) that holds a NaN or an infinity.

    One input like that would turn the weights into NaN, so a set is checked once, before any step.
    """
    bad = inputs.first_non_finite()
    if bad is not None:
        raise ValueError(f"{what}input {bad} holds a NaN or an infinite value; every input must be finite")
    if targets.dtype.kind == "f":
        bad = first_non_finite_row(targets)
        if bad is not None:
            raise ValueError(f"{what}target {bad} holds a NaN or an infinite value; every mse target must be finite")


def _finite(a: np.ndarray, b: np.ndarray | None = None) -> bool:
    """Whether every value of the flat float32 `a` (and `b`) is finite.

    One dot product, as fast as a copy: a NaN or an infinity in either makes it NaN or infinite (inf * 0 is
    NaN). Only when it is not finite (an overflow of huge finite values, or a real NaN) is each value checked.
    Callers silence numpy's overflow warnings (``np.errstate``) once, around many calls.
    """
    return bool(np.isfinite(np.dot(a, a if b is None else b))) or (
        bool(np.isfinite(a).all()) and (b is None or bool(np.isfinite(b).all())))


def _infer_all(model: Engine, inputs: Inputs) -> np.ndarray:
    """The network's outputs for a whole set, EVAL_BATCH inputs at a time through one buffer.

    EVAL_BATCH is the model's native chunk, so every output is computed exactly
    as ``model.forward`` on the whole set would compute it.
    """
    n = len(inputs)
    out = np.empty((n, *model.output_shape), dtype=np.float32)
    buf = model.batch_buffer(min(n, EVAL_BATCH))
    for start, xb in zip(range(0, n, EVAL_BATCH), inputs.chunks(EVAL_BATCH, buf)):
        model.infer_into(xb, out[start:start + len(xb)])
    return out


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts: row = true class, column = predicted class."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (np.asarray(labels, dtype=np.int64), pred), 1)
    return m


@dataclass
class _Kept:
    """The best restart so far: what ``fit`` returns and leaves in the model when every restart is done."""

    loss: float  # its training loss (at its best epoch, with early stopping)
    params: np.ndarray  # its flat parameters
    history: list[Epoch]
    stopped: str
    best_epoch: int | None


@dataclass
class _Job:
    """What every run of one ``fit`` call shares: the settings, the data (checked once) and where results go."""

    settings: Settings
    loss: str
    inputs: Inputs
    targets: np.ndarray
    labels: np.ndarray | None  # class labels, for the accuracy (None: mse targets that are not labels)
    validation: tuple[Inputs, np.ndarray, np.ndarray] | None  # (inputs, y, checked targets)
    checkpoint: str | os.PathLike[str] | None
    log_file: Any
    progress: bool | None
    on_epoch: Callable[[Epoch], None] | None
    interrupted: _deferred_interrupt
    comm: Local  # the ranks of a data-parallel run (``cnnc_runtime.distributed``); Local: this process alone


class _Run:
    """The state of one training run, everything a checkpoint must hold to continue exactly."""

    def __init__(self, model: Engine, s: Settings, restart: int, base_lr: float, finished: list | None = None,
                 kept: _Kept | None = None) -> None:
        self.restart = restart
        self.optimizer = new_optimizer(s)
        self.optimizer.reset()
        self.base_lr = base_lr  # from the settings: neither a checkpoint's nor an earlier restart's decayed lr
        # earlier restarts: their outcomes, and the best of them
        self.finished: list[dict[str, Any]] = finished if finished is not None else []
        self.kept = kept
        self.rng = np.random.default_rng([s.seed, restart, 1])
        self.epoch = 0
        self.step = 0
        self.history: list[Epoch] = []
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self.best_params = model.snapshot()  # with batchnorm's running statistics
        self.bad_epochs = 0
        self.stopped = ""
        # an epoch interrupted by Ctrl-C: its permutation, the next batch, the sums so far, its seconds
        self.partial: dict[str, Any] | None = None


def _checkpoint_arrays(model: Engine, run: _Run, s: Settings) -> dict[str, np.ndarray]:
    arrays = {f"param/{k}": v for k, v in model.state().items()}  # (and batchnorm's state)
    arrays["best_params"] = run.best_params
    for k, v in run.optimizer.state_dict().items():
        arrays[f"opt/{k}"] = np.asarray(v)
    meta = {"epoch": run.epoch, "step": run.step, "restart": run.restart, "best_loss": run.best_loss,
            "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs, "rng": run.rng.bit_generator.state,
            "history": [asdict(e) for e in run.history], "optimizer": type(run.optimizer).__name__,
            "network": model.name, "seed": s.seed}
    meta["finished"] = run.finished
    if run.partial is not None:
        arrays["partial_order"] = run.partial["order"]
        meta["partial"] = {k: v for k, v in run.partial.items() if k != "order"}
    if run.kept is not None:
        arrays["kept_params"] = run.kept.params
        meta["kept"] = {"loss": run.kept.loss, "history": [asdict(e) for e in run.kept.history],
                        "stopped": run.kept.stopped, "best_epoch": run.kept.best_epoch}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def save_checkpoint(path: str | os.PathLike[str], model: Engine, run: _Run, s: Settings) -> None:
    """Atomically write weights, optimizer state, RNG state and history at an epoch boundary."""
    atomic_save_npz(path, _checkpoint_arrays(model, run, s))


def read_checkpoint(path: str | os.PathLike[str],
                    blob: bytes | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(meta, every array) of a checkpoint, read whole: any damage to the archive is one ValueError here.

    `blob`: the file's bytes, already read (by rank 0 of an MPI job, sent to every rank).
    """
    # (read first: zipfile.is_zipfile of a missing or unreadable file is False, "not an .npz archive")
    source = io.BytesIO(_read_bytes(path) if blob is None else blob)
    if not zipfile.is_zipfile(source):  # (np.load would give a .npy's array, not an archive)
        raise ValueError(f"{path}: not a cnnc checkpoint (not an .npz archive)")
    source.seek(0)
    try:
        with np.load(source, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(bytes(arrays.pop("meta")).decode())
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, NotImplementedError, MemoryError,
            zipfile.BadZipFile, zlib.error) as e:  # (MemoryError: a member whose header claims a huge array)
        raise ValueError(f"{path}: not a cnnc checkpoint (unreadable: {type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a cnnc checkpoint (its metadata is not a JSON object)")
    return meta, arrays


class _Meta:
    """Typed reads of a checkpoint's metadata: a field that is missing, of the wrong type or out of range is a
    ValueError naming it (a checkpoint edited by hand, or damaged)."""

    def __init__(self, d: Any, path: str, prefix: str = "") -> None:
        if not isinstance(d, dict):
            raise ValueError(f"{path}: damaged checkpoint: '{prefix.rstrip('.') or 'meta'}' is not an object")
        self.d, self.path, self.prefix = d, path, prefix

    def _bad(self, key: str, need: str) -> ValueError:
        got = repr(self.d[key]) if key in self.d else "nothing"
        return ValueError(f"{self.path}: damaged checkpoint: '{self.prefix}{key}' must be {need}, got {got[:80]}")

    def int(self, key: str, lo: int = 0, hi: float = math.inf, optional: bool = False) -> int | None:
        v = self.d.get(key)
        if v is None and optional and key in self.d:
            return None
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise self._bad(key, f"an integer in [{lo}, {hi}]" + (" or null" if optional else ""))
        return v

    def number(self, key: str, optional: bool = False, infinite: bool = False) -> float | None:
        v = self.d.get(key)
        if v is None and optional and key in self.d:
            return None
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and (infinite or math.isfinite(v))):
            raise self._bad(key, "a number" + (" or null" if optional else ""))
        return float(v)

    def str(self, key: str) -> str:
        v = self.d.get(key)
        if not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def list(self, key: str) -> list:
        v = self.d.get(key)
        if not isinstance(v, list):
            raise self._bad(key, "a list")
        return v

    def sub(self, key: str) -> _Meta:
        return _Meta(self.d.get(key), self.path, f"{self.prefix}{key}.")


def _epochs_of(items: list, path: str, what: str) -> list[Epoch]:
    out = []
    for i, e in enumerate(items):
        m = _Meta(e, path, f"{what}[{i}].")
        if not set(Epoch.__dataclass_fields__) - {"lr"} <= set(e) <= set(Epoch.__dataclass_fields__):
            raise ValueError(f"{path}: damaged checkpoint: '{what}[{i}]' has fields {sorted(e)}")
        out.append(Epoch(m.int("epoch", 1), m.number("loss", infinite=True), m.number("accuracy", optional=True),
                         m.number("val_loss", optional=True, infinite=True), m.number("val_accuracy", optional=True),
                         m.number("seconds"), m.number("images_per_second", infinite=True), m.int("steps"),
                         m.int("restart"), m.number("lr", optional=True) if "lr" in e else None))
    return out


def _finished_of(items: list, path: str) -> list[dict[str, Any]]:
    """The earlier restarts' outcomes, each field checked."""
    for i, f in enumerate(items):
        m = _Meta(f, path, f"finished[{i}].")
        m.int("restart")
        m.int("seed")
        m.number("loss", infinite=True)
        m.int("epochs")
        m.str("stopped")
    return items


def _partial_of(m: _Meta, order: np.ndarray | None, n: int) -> dict[str, Any]:
    """The interrupted epoch's state; its order must be a permutation of the n training images at hand."""
    if order is None or order.shape != (n,) or order.dtype.kind not in "iu" \
            or not np.array_equal(np.sort(order), np.arange(n)):
        got = "nothing" if order is None else f"{order.dtype} {order.shape}"
        raise ValueError(f"{m.path}: its interrupted epoch is over another set of images than these {n} "
                         f"(its order: {got}); resume on the same data")
    nxt = m.int("next", 1, n)
    return {"order": order.astype(np.int64), "next": nxt, "total": m.number("total", infinite=True),
            "correct": m.int("correct", 0, nxt), "seen": m.int("seen", nxt, nxt), "seconds": m.number("seconds")}


def _flat(arrays: dict[str, np.ndarray], key: str, size: int, path: str) -> np.ndarray:
    a = arrays.get(key)
    if a is None or a.dtype.kind != "f" or a.shape != (size,) or not np.isfinite(a).all():
        got = "nothing" if a is None else f"{a.dtype} {a.shape}"
        raise ValueError(f"{path}: damaged checkpoint: '{key}' must be {size} finite floats, got {got}")
    return a.astype(np.float32)


def _restore(path: str | os.PathLike[str], model: Engine, run: _Run, s: Settings, n: int, comm: Local) -> None:
    """Load a checkpoint into `model` and `run`, every field checked first: nothing changes unless all is sound.

    In an MPI job rank 0 reads the file and sends its bytes to every rank, which restores from them.
    """
    blob = None
    if comm.size > 1:
        blob = comm.broadcast_object(_read_bytes(path) if comm.is_root else None)
    meta, arrays = read_checkpoint(path, blob)
    path = str(path)
    m = _Meta(meta, path)
    if m.str("network") != model.name:
        raise ValueError(f"{path} is a checkpoint of network {meta['network']}, not {model.name}")
    if m.str("optimizer") != type(run.optimizer).__name__:
        raise ValueError(f"{path} was written by the {meta['optimizer']} optimizer, "
                         f"not {type(run.optimizer).__name__}")
    size, weights = model.flat_params.size, model.snapshot().size
    m.int("seed")
    epoch, restart = m.int("epoch"), m.int("restart")
    if restart >= s.restarts:
        raise ValueError(f"{path} was written in restart {restart + 1}; resume it with restarts >= {restart + 1}")
    step, bad_epochs = m.int("step"), m.int("bad_epochs")
    best_loss, best_epoch = m.number("best_loss", infinite=True), m.int("best_epoch", 1, epoch, optional=True)
    history = _epochs_of(m.list("history"), path, "history")
    if len(history) != epoch:
        raise ValueError(f"{path}: damaged checkpoint: {len(history)} epochs of history for epoch {epoch}")
    finished = _finished_of(m.list("finished"), path)
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = meta.get("rng")
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f"{path}: damaged checkpoint: 'rng' is not a generator state ({e})") from None
    params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
    expected = model.state()
    for name, v in params.items():
        if name in expected and expected[name].dtype.kind == "i":
            continue  # batchnorm's num_batches_tracked: load_arrays checks it
        if v.dtype.kind != "f" or not np.isfinite(v).all():
            raise ValueError(f"{path}: damaged checkpoint: parameter {name} must be finite floats, got {v.dtype}")
    best_params = _flat(arrays, "best_params", weights, path)
    kept = None
    if meta.get("kept") is not None:
        k = m.sub("kept")
        kept = _Kept(k.number("loss", infinite=True), _flat(arrays, "kept_params", weights, path),
                     _epochs_of(k.list("history"), path, "kept.history"), k.str("stopped"),
                     k.int("best_epoch", 1, optional=True))
    partial = None if meta.get("partial") is None else _partial_of(m.sub("partial"), arrays.get("partial_order"), n)
    opt_state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
    for b in run.optimizer.buffers:
        if b in opt_state:
            _flat(opt_state, b, size, path)
    if set(params) != set(expected) or any(params[k].shape != v.shape for k, v in expected.items()):
        model.load_arrays(params, path)  # raises, naming what does not match
    try:
        run.optimizer.load_state_dict(opt_state)
    except ValueError as e:
        raise ValueError(f"{path}: damaged checkpoint: optimizer state: {e}") from None
    model.load_arrays(params, path)
    run.best_params, run.kept, run.partial = best_params, kept, partial
    run.epoch, run.step, run.restart = epoch, step, restart
    run.best_loss, run.best_epoch, run.bad_epochs = best_loss, best_epoch, bad_epochs
    run.rng.bit_generator.state = rng.bit_generator.state
    run.history, run.finished = history, finished


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: not a readable cnnc checkpoint ({type(e).__name__}: {e})") from None


def fit(model: Engine, x: np.ndarray, y: np.ndarray, *, validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        checkpoint: str | os.PathLike[str] | None = None, resume: str | os.PathLike[str] | None = None,
        log: str | os.PathLike[str] | None = None, progress: bool | None = None,
        on_epoch: Callable[[Epoch], None] | None = None, **settings: Any) -> History:
    """Train `model` in place on (x, y), starting from the weights it has; returns the History of the kept run.

    x is images as ``Model.prepare`` takes them (the input rule of
    ``cnnc_runtime.inputs``), or an ``Inputs``; uint8 images stay uint8: each
    mini-batch is prepared into one reused buffer, with the same result bit
    for bit as preparing the whole set first.

    Settings (``cnnc_runtime.settings.Settings``; each named as in the train
    section, whose values are the defaults): epochs, batch, loss, optimizer
    (a name or an ``Optimizer``), lr, optimizer_args (the optimizer's other
    hyperparameters, e.g. ``{"beta1": 0.8}``), momentum (the beta of sgd with
    momentum; sgd becomes momentum, adam and rmsprop refuse it), validation
    (the fraction held out), patience and min_delta (the train section's
    ``early_stop``): stop when the validation loss (the training loss without
    validation) has not improved by min_delta for patience epochs, and restore
    the best weights; jitter (sigma of
    Gaussian noise added to every training input at every step), weight_decay
    (lambda of lambda * sum(w^2) over weights, not biases), restarts (train K
    runs and keep the one with the lowest training loss: run 0 starts from the
    model's current weights, run k > 0 from weights re-drawn by
    ``model.initialize(seed + k)``), seed (shuffling, jitter, dropout, and the
    restarts' weights), max_steps, min_improvement (stop once an epoch
    improves the training loss by less), lr_decay (the learning rate of epoch
    e is lr * lr_decay**e), schedule (``"cosine"``, ``"step(every=30,
    gamma=0.1)"`` or None: constant; see ``cnnc_runtime.schedule``), warmup
    (epochs of linear warmup in front of the schedule), crop (pad every
    training image by this many zero pixels and crop it back at a random
    place, every step) and flip (mirror half of them at random), both drawn
    per image from the seed, label_smoothing (cross-entropy against
    (1 - e) onehot + e / k, as PyTorch's), clip_norm (scale the gradient of
    the data loss to this global L2 norm when it is larger, before the
    weight decay's term is added). Every setting obeys the train section's rules
    (``cnnc_runtime.rules``); one that does not is a ValueError naming it.
    A setting given as None keeps the train section's value, except patience,
    max_steps and min_improvement, which None switches off. An optimizer
    named here that differs from the file's takes only the file's lr and eps
    (see ``settings_from``). ``batch_size`` and ``validation_split`` are old
    names of batch and validation (a DeprecationWarning).

    Non-finite values cannot train: inputs (and mse targets) holding NaN or
    infinity are refused with a ValueError naming the first such image,
    before any step. A step whose loss or gradient is NaN or infinite, or
    whose update makes a weight so, raises ``TrainingStopped``: the model
    keeps the last good weights (for a bad loss or update, those from before
    it; for a bad gradient, those of that step, the optimizer's state
    untouched by it).

    In every rank of an MPI job (``mpiexec -n N``; see ``cnnc_runtime.distributed``) `fit` trains one model
    data-parallel: `batch` is the global batch, each rank computes its share of every batch and one
    all-reduce of the gradient gives every rank the same step, with the result of one process (dropout and
    jitter follow each image's index in the whole batch; batchnorm's statistics are the whole batch's, which
    needs an image per rank in every batch). Rank 0 alone shows progress, calls `on_epoch`,
    writes the checkpoint and the log, evaluates the validation set and reads `resume`, whose contents it
    sends to the others. A rank that fails ends the whole job (``MPI_Abort``) with its message.
    """
    comm = world()
    try:
        return _fit(model, x, y, comm, validation_data, checkpoint, resume, log, progress, on_epoch, settings)
    except (TrainingStopped, _Interrupted):
        raise  # every rank raises it at the same step
    except BaseException as e:
        abort_on_failure(comm, e)  # in an MPI job: its peers would wait for this rank forever
        raise


def _fit(model: Engine, x, y, comm: Local, validation_data, checkpoint, resume, log, progress, on_epoch,
         settings: dict[str, Any]) -> History:
    settings = renamed(settings, stacklevel=5)  # (the caller of Model.fit)
    for name, path in (("checkpoint", checkpoint), ("resume", resume), ("log", log)):
        if path is not None and not isinstance(path, (str, os.PathLike)):  # (open(1) would be stdout)
            raise ValueError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    s = settings_from(model.manifest.get("train", {}), **settings)
    for name in OPTIONAL:
        if name in settings and settings[name] is None:
            setattr(s, name, None)
    s.check()
    loss = model.loss_name(s.loss)
    check_smoothing(s.label_smoothing, loss)
    check_augment(s.crop, model.input_shape, s.flip)
    inputs = model.inputs(x)
    n = len(inputs)
    targets = model.check_targets(y, n, loss)
    _refuse_non_finite(inputs, targets)
    labels = np.asarray(y) if _labels_like(model, y, loss) else None
    if validation_data is None and s.validation > 0:
        order = np.random.default_rng([s.seed, 7]).permutation(n)
        n_val = int(round(n * s.validation))
        if n_val < 1 or n_val >= n:
            raise ValueError(f"validation {s.validation} leaves no images on one side of {n}")
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        validation_data = (inputs.subset(val_idx), np.asarray(y)[val_idx])  # index views: no copy of the images
        inputs, targets = inputs.subset(train_idx), targets[train_idx]
        labels = labels[train_idx] if labels is not None else None
    if validation_data is not None:
        val_inputs, val_y = model.inputs(validation_data[0]), np.asarray(validation_data[1])
        val_targets = model.check_targets(val_y, len(val_inputs), loss)
        _refuse_non_finite(val_inputs, val_targets, "validation ")
        validation_data = (val_inputs, val_y, val_targets)
    if comm.size > 1:
        _check_ranks_agree(comm, model, s, inputs, targets, validation_data)
        if model.statistics is not None:
            _check_every_rank_has_images(s.batch, len(inputs), comm.size)
        if not comm.is_root:  # rank 0 alone reports and writes
            progress, on_epoch, checkpoint, log = False, None, None, None

    base_lr = new_optimizer(s).lr  # before any restart decays it
    interrupted = _deferred_interrupt()
    finished: list[dict[str, Any]] = []
    kept: _Kept | None = None
    log_file = open(log, "a", encoding="utf-8") if log else None  # noqa: SIM115 - closed in finally
    job = _Job(settings=s, loss=loss, inputs=inputs, targets=targets, labels=labels, validation=validation_data,
               checkpoint=checkpoint, log_file=log_file, progress=progress, on_epoch=on_epoch, interrupted=interrupted,
               comm=comm)
    synchronized = comm.size > 1 and model.statistics is not None
    if synchronized:  # batchnorm's statistics of the whole global batch on every rank
        reducer, model.statistics.reducer = model.statistics.reducer, RankReducer(comm)
    try:
        start_restart = 0
        resumed: _Run | None = None
        if resume is not None:
            resumed = _Run(model, s, 0, base_lr)
            _restore(resume, model, resumed, s, n, comm)
            start_restart, finished, kept = resumed.restart, resumed.finished, resumed.kept
        for restart in range(start_restart, s.restarts):
            if resumed is not None and restart == resumed.restart:
                run = resumed
            else:
                if restart > 0:  # restart 0 trains the weights the model has
                    model.initialize(s.seed + restart)
                run = _Run(model, s, restart, base_lr, finished, kept)
            comm.broadcast(model.flat_params)  # every replica starts from rank 0's weights
            if synchronized:
                comm.broadcast(model.flat_state)  # and its running statistics
            _train_run(model, run, job)
            final = run.history[run.best_epoch - 1] if run.best_epoch else run.history[-1]
            finished.append({"restart": restart, "seed": s.seed + restart, "loss": final.loss,
                             "epochs": len(run.history), "stopped": run.stopped})
            if kept is None or final.loss < kept.loss:
                kept = _Kept(final.loss, model.snapshot(), list(run.history), run.stopped, run.best_epoch)
    finally:
        interrupted.restore()
        if synchronized:
            model.statistics.reducer = reducer
        if log_file:
            log_file.close()
    model.restore(kept.params)
    return History(kept.history, finished, kept.stopped, kept.best_epoch)


def _check_every_rank_has_images(batch: int, n: int, ranks: int) -> None:
    """ValueError unless every batch of an epoch gives each rank an image: a rank without one would not join
    batchnorm's reductions, and its peers would wait for it forever."""
    sizes = {min(batch, n)} | ({n % batch} if n > batch and n % batch else set())
    if min(sizes) < ranks:
        which = "batch" if min(sizes) == min(batch, n) else f"last batch of each epoch ({n} images)"
        raise ValueError(f"a network with batchnorm needs at least one image per rank in every batch: the {which} "
                         f"has {min(sizes)} images for {ranks} ranks (use a larger batch or fewer ranks)")


def _check_ranks_agree(comm: Local, model: Engine, s: Settings, inputs: Inputs, targets: np.ndarray,
                       validation_data) -> None:
    """ValueError on every rank when the ranks of an MPI job were given different networks, data or settings.

    The data is compared by its labels and a sample of its images, prepared: enough to tell files apart.
    """
    def data(inputs: Inputs, targets: np.ndarray) -> str:
        sample = np.unique(np.linspace(0, len(inputs) - 1, min(len(inputs), 64)).astype(np.int64))
        return fingerprint(len(inputs), targets, inputs.batch(sample, model.batch_buffer(len(sample))))

    settings = {k: repr(v) for k, v in asdict(s).items()}
    check_same(comm, **{"compiled network (same .cnn, cnnc and CPU target on every rank)": network_digest(model),
                        "settings": fingerprint(settings), "training data": data(inputs, targets),
                        "validation data": data(*validation_data[::2]) if validation_data else ""})


def network_digest(model: Engine) -> str:
    """What the ranks compare to know they run the same network: its manifest, whose ``cache_key`` hashes
    everything the code is made from (a parallel compile's bytes differ from one compile to the next: which
    process took which kernel); the code itself only for a manifest without one."""
    return fingerprint(model.manifest) if "cache_key" in model.manifest else fingerprint(model.manifest, model.code)


class _deferred_interrupt:  # noqa: N801 - used like a function
    """Ctrl-C during training is noted and acted on between two steps, so the state saved is consistent.

    A second Ctrl-C interrupts at once. Only the main thread receives signals;
    elsewhere nothing is installed and Ctrl-C behaves as usual.
    """

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._note)

    def _note(self, signum, frame) -> None:
        self.flag.set()
        self.restore()

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def is_set(self) -> bool:
        return self.flag.is_set()


def _stop(run: _Run, bar: ProgressBar, why: str, kept: str) -> None:
    run.stopped = why
    bar.close()
    raise TrainingStopped(f"training stopped: {why}; {kept}")


def _stop_step(model: Engine, good: np.ndarray, run: _Run, bar: ProgressBar, value: float, b: int) -> None:
    """Stop at a step whose loss or gradient is not finite, or that starts from weights that are not."""
    _check_update(model, good, run, bar)  # weights the last update broke explain a bad loss: blame that update
    where = f"at epoch {run.epoch + 1}, step {b + 1}"
    if not math.isfinite(value):  # these weights have no finite loss: back to the last ones that had
        model.restore(good)
        _stop(run, bar, f"the loss became {value} {where}", "kept the weights of the last step with a finite loss")
    _stop(run, bar, f"a gradient became NaN or infinite {where}", "kept the weights of that step")


def _check_update(model: Engine, good: np.ndarray, run: _Run, bar: ProgressBar) -> None:
    """Stop with the weights from before the last update (`good`) if it made any weight NaN or infinite.

    Every step checks the weights it starts from; this also runs where no step follows (the epoch's end, an
    interrupt). The optimizer's state keeps that update's moments.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        finite = _finite(model.flat_params)
    if not finite:
        model.restore(good)
        _stop(run, bar, f"an update made a weight NaN or infinite in epoch {run.epoch + 1}",
              "kept the weights from before that update")


def _train_run(model: Engine, run: _Run, job: _Job) -> None:
    """Train one run with the optimizer's native update bound for its duration (it lives in the model's code)."""
    run.optimizer.use_native(model.native_update(run.optimizer))
    try:
        _train_epochs(model, run, job)
    finally:
        run.optimizer.use_native(None)


def _native_steps(native: NativeRun, run: _Run, s: Settings, idx: np.ndarray, size: int,
                  lr_of: Callable[[int], float], labels: np.ndarray | None,
                  job: _Job) -> tuple[list[float], int, int, bool, float]:
    """A run of steps of `size` images on the images `idx`, natively (``cnnc_runtime.steploop``): (the loss of
    each step done and of the one that failed, if any; the steps done; the right predictions of those; whether
    any rank was interrupted; the seconds per image, rank 0's, to size the next run).

    The seeds are drawn from the run's generator in the per-step path's order (jitter, dropout, crop and flip,
    each only when used), the learning rates by the schedule: the same numbers, so the same weights. In an MPI
    job each rank runs its part of every step's batch (as the per-step path shares it out), and the ranks add up
    the losses, the right predictions and the interrupts with each step's gradient (``NativeRun.tallies``), so
    all take the same decisions.
    """
    clock = time.perf_counter()
    steps = len(idx) // size
    comm = job.comm
    lo, hi = share(size, comm.rank, comm.size)  # this rank's images of every step's batch
    idx = idx.reshape(steps, size)[:, lo:hi].reshape(-1)
    model = native.model
    used = [(SEEDS.index("noise"), s.jitter > 0), (SEEDS.index("dropout"), model.manifest["has_dropout"]),
            (SEEDS.index("shift"), s.crop > 0 or s.flip)]
    columns = [column for column, on in used if on]
    seeds = np.zeros((steps, len(SEEDS)), dtype=np.int64)
    if columns:  # (one call draws what as many calls, one number each, would: the same stream)
        seeds[:, columns] = run.rng.integers(0, 2**63 - 1, size=steps * len(columns)).reshape(steps, len(columns))
    lrs = [lr_of(run.step + i) for i in range(steps)]
    done, sums, out, penalties = native.run(idx, hi - lo, seeds, lrs, image0=lo, whole=size,
                                            labels=labels[idx] if labels is not None and native.comm else None)
    counted = min(done + 1, steps)
    if native.comm is not None:  # (the ranks' sums, made with each step's gradient)
        tallies = native.tallies[:counted]
        last = tallies[-1]
        seconds = last[TALLY.index("seconds")] / (counted * size)
        values = [float(tallies[i, TALLY.index("loss")]) + float(penalties[i]) for i in range(counted)]
        return (values, done, int(tallies[:done, TALLY.index("right")].sum()),
                bool(last[TALLY.index("interrupted")]), seconds)
    scale = model.loss_scale(native.loss, size)
    n = done * (hi - lo)
    right = int((out[:n].argmax(axis=1) == labels[idx[:n]]).sum()) if labels is not None else 0
    values = [float(sums[i] * scale) + float(penalties[i]) for i in range(counted)]
    return values, done, right, job.interrupted.is_set(), (time.perf_counter() - clock) / max(done * size, 1)


def _train_epochs(model: Engine, run: _Run, job: _Job) -> None:
    s, loss, inputs, targets, labels, comm = job.settings, job.loss, job.inputs, job.targets, job.labels, job.comm
    n = len(inputs)
    lo, hi = share(min(s.batch, n), comm.rank, comm.size)  # a batch larger than the set is the whole set
    size = max(hi - lo, 1)  # this rank's share of a full batch (the largest it gets)
    batch = model.batch_buffer(size)  # every step's inputs are prepared into this one buffer
    k = model.manifest["loss_inputs"][loss]
    out = np.empty((size, k), dtype=np.float32)
    losses = np.empty(size, dtype=np.float32)
    optimizer = run.optimizer
    good = model.snapshot()  # the weights (and running statistics) from before the last update
    bn_grads = [model.grads[f"{name}.{kind}"] for name in (model.statistics.layers if model.statistics else ())
                for kind in ("weight", "bias")]
    decay_scratch = np.empty_like(model.flat_params) if s.weight_decay > 0 else None
    sums = np.zeros(3)  # what the ranks add up after each step: the loss, the correct predictions, interrupts
    prev_loss = run.history[-1].loss if run.history else math.inf
    schedule = make_schedule(s.schedule, s.warmup, s.lr_decay)
    steps_per_epoch = -(-n // s.batch)
    total_steps = s.epochs * steps_per_epoch  # (max_steps is a stop, not the schedule's length: resume stays exact)
    augmenting = s.crop > 0 or s.flip
    gather = model.gatherer(inputs, batch)  # each pool thread gathers its own images, natively (None: by numpy)
    fill = model.augment_fill(inputs.blank()) if augmenting else None

    def lr_of(step: int) -> float:
        return run.base_lr * schedule.factor(step, steps_per_epoch, total_steps)

    def one_step(order: np.ndarray, index: int, start: int, bar: ProgressBar) -> tuple[float, int, int, bool]:
        """Batch `index` of the epoch (its images from `start` in `order`), one native call per thread and Python
        between them: (its loss, its images, the right predictions, whether any rank was interrupted)."""
        whole = order[start:start + s.batch]
        lo, hi = share(len(whole), comm.rank, comm.size)  # this rank's images: [lo, hi) of the batch
        idx, m = whole[lo:hi], hi - lo
        xb, tb = batch[:m], targets[idx]
        # native Gaussian noise: a seed from the run's generator, so resume stays exact
        noise = int(run.rng.integers(0, 2**63 - 1)) if s.jitter > 0 else None
        seed = int(run.rng.integers(0, 2**63 - 1)) if model.manifest["has_dropout"] else 0
        # crop and flip: drawn natively per image from this seed (drawn only when asked for: runs without
        # augmentation keep the random stream they had)
        shift = int(run.rng.integers(0, 2**63 - 1)) if augmenting else None
        optimizer.lr = lr_of(run.step)

        if gather is not None:
            gather.select(idx)

        def prepare(t: int, a: int, b: int, idx=idx, noise=noise, shift=shift, lo=lo) -> None:
            if gather is not None:
                gather(a, b)
            else:
                inputs.batch(idx[a:b], batch[a:b])
            if shift is not None:
                model.augment(batch, shift, s.crop, s.flip, fill, rows=(a, b), thread=t, image0=lo)
            if noise is not None:
                model.add_noise(batch, s.jitter, noise, rows=(a, b), thread=t, image0=lo)

        with model.lock:  # value_and_grad on another thread must not mix its gradients into this step's
            sums[0] = model.gradients(xb, tb, loss, seed=seed, out=out[:m], losses=losses[:m],
                                      prepare=prepare, label_smoothing=s.label_smoothing, image0=lo,
                                      whole=len(whole)) if m else 0.0
            if not m:  # (a batch smaller than the ranks: this one has no image of it)
                model.flat_grads[...] = 0.0
            if not comm.is_root:  # batchnorm's weight and bias gradients: the whole batch's on every rank
                for g in bn_grads:
                    g[...] = 0.0
            sums[1] = int((out[:m].argmax(axis=1) == labels[idx]).sum()) if labels is not None else 0
            sums[2] = job.interrupted.is_set()
            if comm.size > 1:  # the gradient of the whole batch, on every rank (and the sums, in one collective)
                comm.sum_in_place(model.flat_grads, sums)
            value, m = float(sums[0]), len(whole)
            if s.clip_norm is not None:  # the data loss's gradient, before the L2 term (as torch's decay)
                clip_grad_norm(model.flat_grads, s.clip_norm)
            if s.weight_decay > 0:
                value += add_weight_decay(model.flat_params, model.flat_grads, model.decay_mask, s.weight_decay,
                                          decay_scratch)
            if not (math.isfinite(value) and _finite(model.flat_grads, model.flat_params)):
                _stop_step(model, good, run, bar, value, index)
            model.snapshot(out=good)
            model.update(optimizer)
        return value, m, int(sums[1]), bool(sums[2])

    native = None
    if unsupported(model, s, gather, optimizer) is None:
        native = NativeRun(model, loss, gather, targets, optimizer, s, fill, good, comm, job.interrupted.is_set)
    image_seconds = 0.0  # (measured by each run, per image: an epoch's short last batch says little of a step)

    while run.epoch < s.epochs and not run.stopped:
        t0 = time.perf_counter()
        if run.partial is not None:  # resuming inside an epoch
            p = run.partial
            order, first, total, correct, seen = p["order"], p["next"], p["total"], p["correct"], p["seen"]
            t0 -= p["seconds"]
        else:
            order, first, total, correct, seen = run.rng.permutation(n), 0, 0.0, 0, 0
        bar = ProgressBar(-(-n // s.batch), enabled=job.progress)
        b, start = first // s.batch, first  # the next batch's index in the epoch and its first image
        with np.errstate(over="ignore", invalid="ignore"):  # a NaN or an overflow is found and reported below
            while start < n:
                size = min(s.batch, n - start)
                if (native is not None and comm.size <= size and -(-size // comm.size) <= CHUNK
                        and native.takes_optimizer()):  # a run of steps, natively (every rank has images)
                    # (a resume past the limit still takes the one step the per-step path takes)
                    limit = max(1, s.max_steps - run.step) if s.max_steps is not None else native.max_steps
                    steps = min(run_length(image_seconds * size, native.max_steps), (n - start) // size, limit)
                    values, done, right, interrupted, image_seconds = _native_steps(
                        native, run, s, order[start:start + steps * size], size, lr_of, labels, job)
                    if done < steps or interrupted:  # (Python reads the weights next)
                        native.settle()
                    for value in values[:done]:  # (in order: the epoch's sum as the per-step path adds it)
                        total += value * size
                    run.step += done
                    seen += done * size
                    correct += right
                    if done < steps:
                        _stop_step(model, good, run, bar, values[done], b + done)
                    b, start = b + steps, start + steps * size
                else:
                    if native is not None:  # (the weights a sharded run left in shared memory)
                        native.settle()
                    value, m, right, interrupted = one_step(order, b, start, bar)
                    run.step += 1
                    total += value * m
                    seen += m
                    correct += right
                    b, start = b + 1, start + m
                elapsed = time.perf_counter() - t0
                bar.update(b, total / seen, correct / seen if labels is not None else None,
                           seen / max(elapsed, 1e-9), optimizer.lr)
                if interrupted:  # (every rank sees an interrupt on any rank at the same step)
                    _check_update(model, good, run, bar)
                    bar.close()
                    run.partial = {"order": order, "next": start, "total": total, "correct": correct, "seen": seen,
                                   "seconds": time.perf_counter() - t0}
                    if job.checkpoint is not None:
                        save_checkpoint(job.checkpoint, model, run, s)
                    raise _Interrupted
                if s.max_steps is not None and run.step >= s.max_steps:
                    run.stopped = f"reached the step limit of {s.max_steps}"
                    break
        if native is not None:  # (every rank at the same point: the weights back from a sharded run)
            native.settle()
        _check_update(model, good, run, bar)  # the epoch's last update, which no later step checks
        bar.close()
        run.partial = None
        seconds = time.perf_counter() - t0
        val_loss = val_acc = None
        if job.validation is not None:  # by rank 0, while the others wait for its result
            if comm.is_root:
                val_loss, val_acc, _ = _evaluate(model, *job.validation, loss)
            val_loss, val_acc = comm.broadcast_object((val_loss, val_acc))
        run.epoch += 1
        record = Epoch(run.epoch, total / seen, correct / seen if labels is not None else None, val_loss, val_acc,
                       seconds, seen / seconds, run.step, run.restart, optimizer.lr)
        run.history.append(record)
        monitored = val_loss if val_loss is not None else record.loss
        if monitored < run.best_loss - s.min_delta:
            run.best_loss, run.best_epoch, run.bad_epochs = monitored, run.epoch, 0
            model.snapshot(out=run.best_params)
        else:
            run.bad_epochs += 1
            if s.patience is not None and run.bad_epochs >= s.patience:
                run.stopped = f"early stop: no improvement for {s.patience} epochs (best epoch {run.best_epoch})"
        if s.min_improvement is not None and prev_loss - record.loss < s.min_improvement and not run.stopped:
            run.stopped = f"the training loss improved by less than {s.min_improvement}"
        prev_loss = record.loss
        if job.checkpoint is not None:  # before the epoch is reported: what was announced can be resumed
            save_checkpoint(job.checkpoint, model, run, s)
        if job.log_file:
            job.log_file.write(json.dumps(asdict(record)) + "\n")
            job.log_file.flush()
        if job.on_epoch:
            job.on_epoch(record)
    if not run.stopped:
        run.stopped = f"completed {run.epoch} epochs"
    if s.patience is not None and run.best_epoch is not None:
        model.restore(run.best_params)
