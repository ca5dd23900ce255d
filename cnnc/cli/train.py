"""`cnnc train`: train a network with its train section's settings, every one of them overridable by a flag."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cnnc.cli.common import (
    UsageError,
    check_outputs,
    data_inputs,
    data_path,
    dataset,
    existing,
    integer,
    load_model,
    path,
    percent,
    reading,
    real,
    writing,
)
from cnnc.errors import CnnError, Diagnostics
from cnnc_runtime.distributed import Local, abort_on_failure, world
from cnnc_runtime.fileio import atomic_write
from cnnc_runtime.optimizers import OPTIMIZERS
from cnnc_runtime.schedule import parse as parse_schedule
from cnnc_runtime.settings import settings_from
from cnnc_runtime.train import Epoch, History, TrainingStopped, evaluate, read_checkpoint

# the flags that set a training setting (``cnnc_runtime.settings.Settings``), each by that setting's name
SETTING_FLAGS = ("epochs", "batch", "optimizer", "lr", "momentum", "weight_decay", "jitter", "validation", "patience",
                 "restarts", "seed", "max_steps", "lr_decay", "schedule", "warmup", "crop", "flip", "label_smoothing",
                 "clip_norm")


def _epoch_line(e: Epoch, epochs: int) -> str:
    parts = [f"epoch {e.epoch:>{len(str(epochs))}}/{epochs}", f"loss {e.loss:.4f}", f"acc {percent(e.accuracy)}"]
    if e.val_loss is not None:
        parts += [f"val_loss {e.val_loss:.4f}", f"val_acc {percent(e.val_accuracy)}"]
    if e.lr is not None:
        parts.append(f"lr {e.lr:.3g}")
    parts += [f"{e.seconds:.1f} s", f"{e.images_per_second:,.0f} img/s"]
    return "  ".join(parts)


def _plot(history: History, path: str) -> None:
    import matplotlib  # (an optional dependency, the plot extra: imported only when asked for a plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # (after choosing the backend, which must come first)

    epochs = [e.epoch for e in history.epochs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [e.loss for e in history.epochs], label="train")
    if any(e.val_loss is not None for e in history.epochs):
        ax1.plot(epochs, [e.val_loss for e in history.epochs], label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    if any(e.accuracy is not None for e in history.epochs):
        ax2.plot(epochs, [e.accuracy for e in history.epochs], label="train")
        if any(e.val_accuracy is not None for e in history.epochs):
            ax2.plot(epochs, [e.val_accuracy for e in history.epochs], label="validation")
        ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        ax2.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _written(e: OSError, outputs: dict[str, str | None]) -> str:
    """Which output the failed write was for (atomic writes go through a temporary ``.NAME.*.tmp``)."""
    given = {label: p for label, p in outputs.items() if p}
    if e.filename:
        failed = Path(os.path.abspath(e.filename))
        for p in given.values():
            target = Path(os.path.abspath(p))
            if failed == target or (failed.parent == target.parent and failed.name.startswith(f".{target.name}.")):
                return p
        return str(e.filename)
    return " or ".join(f"{p} ({label})" for label, p in given.items())  # a write(2) error names no file


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    """`cnnc train`, also as every rank of an MPI job (``mpiexec -n N cnnc train ...``): rank 0 alone prints and
    writes, the others wait for it at the end; a rank that fails ends the whole job."""
    try:
        comm = world()
    except RuntimeError as e:  # an MPI launcher, but no mpi4py
        raise UsageError(f"cnnc train: {e}") from None
    with _sigterm_as_ctrl_c() as terminated:
        try:
            status = _train(args, diag, comm)
            comm.barrier()
        except BaseException as e:
            abort_on_failure(comm, e, (UsageError, CnnError))  # its peers would wait for this rank forever
            if terminated and isinstance(e, KeyboardInterrupt):  # (before training: nothing to save)
                print("cnnc: terminated", file=sys.stderr)
                return 128 + signal.SIGTERM
            raise
    return 128 + signal.SIGTERM if terminated and status == 130 else status


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """SIGTERM (``kill``, a batch system's time limit) taken as a Ctrl-C: training stops between two steps with
    its checkpoint written, instead of dying mid-epoch; the list yielded gets the signal, for the exit status
    (128 + 15, as a shell reports a process SIGTERM ended)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # (only the main thread may set handlers)
        yield received
        return

    def note(signum: int, frame: object) -> None:
        received.append(signum)
        on_ctrl_c = signal.getsignal(signal.SIGINT)  # training's (see cnnc_runtime.train), else Python's
        if callable(on_ctrl_c):
            on_ctrl_c(signal.SIGINT, frame)
        else:  # (Ctrl-C ignored, as in a background job of a script: SIGTERM still stops the run)
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, note)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, old)


def _silent(*args, **kwargs) -> None:
    """`print` on the ranks of an MPI job other than rank 0."""


def _train(args: argparse.Namespace, diag: Diagnostics, comm: Local) -> int:
    say = print if comm.is_root else _silent
    if args.plot:
        try:
            import matplotlib  # noqa: F401 (an optional dependency: its absence is found before any training)
        except ImportError:
            raise UsageError("cnnc train: --plot needs matplotlib: pip install 'cnnc[plot]'") from None
    outputs = {"-o": args.output, "--checkpoint": args.checkpoint, "--log": args.log, "--plot": args.plot}
    inputs = {"FILE": args.file, **data_inputs(args.data), "--resume": args.resume}
    resumed = (("--checkpoint", "--resume"), ("the default --checkpoint", "--resume"))  # a run continued
    rules = dict(appended=("--log",), may_replace=resumed)
    check_outputs("train", inputs, outputs, **rules)
    if args.resume and comm.is_root:  # (rank 0 reads it and sends it to the others)
        _check_checkpoint(args.resume)
    model = load_model(args.file, args, diag, seed=args.seed)
    name = model.name
    out = args.output or f"{name}.weights.npz"
    ckpt = args.checkpoint or f"{name}.ckpt.npz"
    outputs.update({"-o" if args.output else "the default -o": out,
                    "--checkpoint" if args.checkpoint else "the default --checkpoint": ckpt})
    if not args.data:
        inputs.update(data_inputs(data_path(args, model), "the train section's data"))
    check_outputs("train", inputs, outputs, **rules)
    # each flag is the training setting of its name (fit's keyword, the train section's key); unset: the file's
    settings = {name: getattr(args, name) for name in SETTING_FLAGS if getattr(args, name) is not None}
    try:  # fit's rules (settings_from, Settings.check): checked here too, before the data is loaded
        chosen = settings_from(model.manifest.get("train", {}), **settings)
        chosen.check()
        epochs = chosen.epochs
    except ValueError as e:
        raise UsageError(f"cnnc train: {e}") from None
    data, path = dataset(args, model, args.subset)
    x, y = data["train"]
    ranks = f", {comm.size} MPI ranks" if comm.size > 1 else ""
    say(f"training {name} on {path} ({len(x):,} images), {model.manifest['target']['cpu']}{ranks}", flush=True)
    try:
        history = model.fit(x, y, checkpoint=ckpt, resume=args.resume, log=args.log,
                            on_epoch=lambda e: print(_epoch_line(e, epochs), flush=True), **settings)
    except KeyboardInterrupt:
        if Path(ckpt).is_file():
            say(f"\ninterrupted: training state saved in {ckpt}; continue with --resume {ckpt}", file=sys.stderr)
        else:
            say("\ninterrupted: no checkpoint was written", file=sys.stderr)
        return 130
    except TrainingStopped as e:
        if comm.is_root:
            with writing("train", out):
                model.save(out)
        say(f"{e}; wrote {out}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise UsageError(f"cnnc train: {e}") from None
    except OSError as e:  # the checkpoint or the log, mid-training: a full disk, a removed directory
        written = _written(e, {"--checkpoint": ckpt, "--log": args.log})
        raise UsageError(f"cnnc train: cannot write {written}: {e.strerror or e}") from None
    if not comm.is_root:
        return 0
    with writing("train", out):
        model.save(out)
    if len(history.restarts) > 1:
        for r in history.restarts:
            print(f"restart {r['restart'] + 1}: seed {r['seed']}, training loss {r['loss']:.4f}, "
                  f"{r['epochs']} epochs")
    total = sum(e.seconds for e in history.epochs)
    print(f"stopped: {history.stopped}; {len(history.epochs)} epochs in {total:.1f} s; wrote {out}")
    if "test" in data:
        xt, yt = data["test"]
        loss, acc, _ = evaluate(model, xt, yt)
        print(f"test: loss {loss:.4f}, accuracy {percent(acc)} (error {percent(None if acc is None else 1 - acc)}) "
              f"on {len(xt):,} images")
    if args.plot:
        with writing("train", args.plot):
            _plot(history, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _schedule(text: str) -> str:
    """An argparse type: a schedule as ``cnnc_runtime.schedule.parse`` reads it."""
    try:
        parse_schedule(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _check_checkpoint(path: str) -> None:
    """--resume must be an intact checkpoint, found before the compile and the data load (fit reads it again to
    check what its metadata says against the model)."""
    with reading("train", existing(path)):
        try:
            read_checkpoint(path)
        except ValueError as e:
            raise UsageError(f"cnnc train: {e}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    count, nonneg = integer(1), real(0, what="a non-negative number")
    fraction = real(0, 1, below=True, what="a fraction in [0, 1)")
    tr = sub.add_parser("train", help="train a network on a dataset",
                        description="Train a network with the settings of its train section; every setting can "
                                    "be overridden here. Writes the weights (-o), a checkpoint after every epoch "
                                    "(resume with --resume), and reports the test accuracy when the data has a "
                                    "test split. No output may be one of the inputs (the checkpoint resumed "
                                    "from may be written again).")
    tr.add_argument("file", type=path, help="the .cnn file")
    tr.add_argument("--data", type=path, metavar="DIR|FILE.npz",
                    help="a directory of IDX files (train-images-idx3-ubyte.gz ...), of CIFAR-10 binary batches "
                         "(data_batch_1.bin ...) or of image folders per class (CLASS/*.png, needs Pillow), or an "
                         ".npz with x, y (and x_test, y_test); default: the train section's data, relative to FILE")
    tr.add_argument("--epochs", type=count, help="number of epochs (a positive integer)")
    tr.add_argument("--batch", type=count,
                    help="mini-batch size; one larger than the training set means the whole set")
    tr.add_argument("--optimizer", choices=list(OPTIMIZERS),
                    help="replaces the train section's optimizer; of its arguments only lr (and eps) carry over")
    tr.add_argument("--lr", type=real(0, above=True, what="a positive number"), help="learning rate")
    tr.add_argument("--momentum", type=fraction, metavar="BETA",
                    help="momentum beta in [0, 1): trains with momentum (sgd becomes momentum; nesterov takes it as "
                         "its beta); refused when the optimizer is adam, adamw or rmsprop")
    tr.add_argument("--weight-decay", type=nonneg, metavar="LAMBDA",
                    help="L2: adds lambda * sum(w^2) to the loss")
    tr.add_argument("--jitter", type=nonneg, metavar="SIGMA", help="Gaussian noise added to every training input")
    tr.add_argument("--validation", type=fraction, metavar="FRACTION",
                    help="fraction of training data held out, in [0, 1)")
    tr.add_argument("--patience", type=count, help="early stop after this many epochs without improvement")
    tr.add_argument("--restarts", type=count, help="train K times from different initialisations, keep the best")
    tr.add_argument("--seed", type=integer(0), help="a non-negative integer")
    tr.add_argument("--max-steps", type=count, help="stop after this many optimizer steps")
    tr.add_argument("--lr-decay", type=real(0, 1, above=True, what="a factor in (0, 1]"), metavar="FACTOR",
                    help="exponential schedule: the learning rate of epoch e is lr * FACTOR^e")
    tr.add_argument("--schedule", type=_schedule, metavar="SCHEDULE",
                    help="learning-rate schedule, updated every step: constant, cosine (to 0 over the run) or "
                         "'step(every=EPOCHS, gamma=0.1)'")
    tr.add_argument("--warmup", type=integer(0), metavar="EPOCHS",
                    help="linear learning-rate warmup over this many epochs, in front of the schedule")
    tr.add_argument("--crop", type=integer(0, (1 << 15) - 1), metavar="PAD",
                    help="augmentation: pad each training image by PAD zero pixels and crop it back at a random "
                         "place, every step (0: off)")
    tr.add_argument("--flip", action=argparse.BooleanOptionalAction,
                    help="augmentation: mirror each training image left-right with probability 1/2, every step")
    tr.add_argument("--label-smoothing", type=fraction, metavar="EPS",
                    help="cross-entropy against (1 - EPS) one-hot + EPS / classes, as PyTorch's")
    tr.add_argument("--clip-norm", type=real(0, above=True, what="a positive number"), metavar="NORM",
                    help="scale each step's gradient to this global L2 norm when it is larger")
    tr.add_argument("--subset", type=integer(0), default=0, metavar="N",
                    help="train on the first N training images only (0, the default: all)")
    tr.add_argument("-o", "--output", type=path, metavar="W.npz",
                    help="where to write the weights (default NETWORK.weights.npz)")
    tr.add_argument("--checkpoint", type=path, metavar="CKPT", help="checkpoint path (default NETWORK.ckpt.npz)")
    tr.add_argument("--resume", type=path, metavar="CKPT", help="continue from a checkpoint")
    tr.add_argument("--log", type=path, metavar="METRICS.jsonl", help="append one JSON line per epoch")
    tr.add_argument("--plot", type=path, metavar="CURVES.png",
                    help="plot the loss and accuracy curves (needs matplotlib)")
    tr.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    tr.set_defaults(run=run)
