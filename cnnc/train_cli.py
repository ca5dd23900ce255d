"""`cnnc train`, `cnnc eval` and `cnnc gradcheck`: the commands that need data."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from cnnc.errors import Diagnostics
from cnnc_runtime.optimizers import OPTIMIZERS

MAX_GRADCHECK_BATCH = 1024  # a random batch to check gradients on; its float64 reference runs per sample


def _usage(message: str):
    from cnnc.cli import UsageError

    return UsageError(message)


def _data_path(args, model) -> Path:
    """--data, else the train section's `data`, relative to the .cnn file."""
    if args.data:
        return Path(args.data)
    rel = model.manifest.get("train", {}).get("data")
    if rel is None:
        raise _usage(f"cnnc {args.command}: no data; give --data DIR|FILE.npz or write "
                     f'data "PATH" in the train section of {args.file}')
    return Path(args.file).parent / rel


def _data_inputs(path: str | Path | None, label: str = "--data") -> dict[str, str | None]:
    """The files a dataset path stands for (a directory: its IDX files), labelled for `check_outputs`."""
    from cnnc_runtime.data import IDX_FILES

    files: dict[str, str | None] = {label: None if path is None else str(path)}
    if path is not None and Path(path).is_dir():
        for stem in (s for pair in IDX_FILES.values() for s in pair):
            for name in (stem, stem + ".gz"):
                files[f"{label} file {name}"] = str(Path(path) / name)
    return files


def _dataset(args, model, subset: int = 0):
    """{split: (inputs, targets)}: uint8 images as stored (fit and evaluate prepare each batch), others prepared.

    `subset` > 0 keeps the first `subset` training images (a view, before anything is prepared)."""
    from cnnc_runtime.data import load_dataset

    path = _data_path(args, model)
    try:
        splits = load_dataset(path, raw=True)
        if subset:
            train = splits["train"]
            splits["train"] = dataclasses.replace(train, x=train.x[:subset], y=train.y[:subset])
        return {name: (_inputs(model, d.x), d.y) for name, d in splits.items()}, path
    except (OSError, ValueError) as e:
        raise _usage(f"cnnc {args.command}: {e}") from None
    except MemoryError:  # sizes in a file's headers are the file's word, not cnnc's
        raise _usage(f"cnnc {args.command}: {path}: too large to load into memory") from None


def _inputs(model, x: np.ndarray):
    """uint8 images stay as stored (an ``Inputs`` set, its shape checked now, before any training); others are
    prepared and normalized here once."""
    if x.dtype == np.uint8:
        return model.inputs(x)
    from cnnc_runtime.data import prepare_images

    x = prepare_images(x, model.input_shape)
    norm = model.manifest.get("train", {}).get("normalize")
    if norm:
        x = (x - np.float32(norm["mean"])) / np.float32(norm["std"])
    return x


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _epoch_line(e, epochs: int) -> str:
    parts = [f"epoch {e.epoch:>{len(str(epochs))}}/{epochs}", f"loss {e.loss:.4f}", f"acc {_pct(e.accuracy)}"]
    if e.val_loss is not None:
        parts += [f"val_loss {e.val_loss:.4f}", f"val_acc {_pct(e.val_accuracy)}"]
    parts += [f"{e.seconds:.1f} s", f"{e.images_per_second:,.0f} img/s"]
    return "  ".join(parts)


def _plot(history, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnnc_runtime.fileio import atomic_write

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


def cmd_train(args, diag: Diagnostics) -> int:
    from cnnc.cli import _load_model, check_outputs, writing
    from cnnc_runtime.train import TrainingStopped, evaluate, settings_from

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _usage("cnnc train: --plot needs matplotlib: pip install 'cnnc[plot]'") from None
    outputs = {"-o": args.output, "--checkpoint": args.checkpoint, "--log": args.log, "--plot": args.plot}
    inputs = {"FILE": args.file, **_data_inputs(args.data), "--resume": args.resume}
    resumed = (("--checkpoint", "--resume"), ("the default --checkpoint", "--resume"))  # a run continued
    rules = dict(appended=("--log",), may_replace=resumed)
    check_outputs("train", inputs, outputs, **rules)
    if args.resume:
        _check_checkpoint(args.resume)
    model = _load_model(args.file, args, diag, seed=args.seed)
    name = model.name
    out = args.output or f"{name}.weights.npz"
    ckpt = args.checkpoint or f"{name}.ckpt.npz"
    outputs.update({"-o" if args.output else "the default -o": out,
                    "--checkpoint" if args.checkpoint else "the default --checkpoint": ckpt})
    if not args.data:
        inputs.update(_data_inputs(_data_path(args, model), "the train section's data"))
    check_outputs("train", inputs, outputs, **rules)
    train = model.manifest.get("train", {})
    try:  # the optimizer's rules are fit's (settings_from): checked here too, before the data is loaded
        settings_from(train, optimizer=args.optimizer, momentum=args.momentum)
    except ValueError as e:
        raise _usage(f"cnnc train: {e}") from None
    data, path = _dataset(args, model, args.subset)
    x, y = data["train"]
    batch = args.batch or train.get("batch")
    if batch is not None and batch > len(x) > 0:  # as in Keras: the whole set, and no buffer sized beyond it
        batch = len(x)
    settings = dict(epochs=args.epochs, batch_size=batch, lr=args.lr,
                    weight_decay=args.weight_decay, jitter=args.jitter, validation_split=args.validation,
                    patience=args.patience, restarts=args.restarts, seed=args.seed, max_steps=args.max_steps,
                    optimizer=args.optimizer, momentum=args.momentum)
    epochs = args.epochs or train.get("epochs", 10)
    print(f"training {name} on {path} ({len(x):,} images), {model.manifest['target']['cpu']}", flush=True)
    try:
        history = model.fit(x, y, checkpoint=ckpt, resume=args.resume, log=args.log,
                            on_epoch=lambda e: print(_epoch_line(e, epochs), flush=True), **settings)
    except KeyboardInterrupt:
        if Path(ckpt).is_file():
            print(f"\ninterrupted: training state saved in {ckpt}; continue with --resume {ckpt}", file=sys.stderr)
        else:
            print("\ninterrupted: no checkpoint was written", file=sys.stderr)
        return 130
    except TrainingStopped as e:
        with writing("train", out):
            model.save(out)
        print(f"{e}; wrote {out}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise _usage(f"cnnc train: {e}") from None
    except OSError as e:  # the checkpoint or the log, mid-training: a full disk, a removed directory
        written = _written(e, {"--checkpoint": ckpt, "--log": args.log})
        raise _usage(f"cnnc train: cannot write {written}: {e.strerror or e}") from None
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
        print(f"test: loss {loss:.4f}, accuracy {_pct(acc)} (error {_pct(None if acc is None else 1 - acc)}) "
              f"on {len(xt):,} images")
    if args.plot:
        with writing("train", args.plot):
            _plot(history, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_checkpoint(path: str) -> None:
    """--resume must be an intact .npz with a JSON object as its metadata: every member is read now (a flipped
    bit fails its CRC here, not in the middle of restoring); fit checks what the metadata says."""
    import zipfile

    from cnnc.cli import _existing, reading

    p = _existing(path)
    problem = None
    with reading("train", p):
        if not zipfile.is_zipfile(p):
            problem = "not an .npz archive"
        else:
            try:
                with zipfile.ZipFile(p) as zf:
                    damaged = zf.testzip()  # reads every member in chunks: nothing allocated at a claimed size
                if damaged:
                    problem = f"damaged member {damaged}"
                else:
                    with np.load(p, allow_pickle=False) as z:
                        meta = json.loads(bytes(z["meta"]).decode()) if "meta" in z.files else None
                    if not isinstance(meta, dict):
                        problem = "no metadata" if meta is None else "its metadata is not a JSON object"
            except (ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                problem = f"damaged: {e}"
    if problem:
        raise _usage(f"cnnc train: {path}: not a cnnc checkpoint ({problem})")


def cmd_eval(args, diag: Diagnostics) -> int:
    from cnnc.cli import _existing, _load_model, is_artifact
    from cnnc_runtime.train import confusion_matrix, evaluate

    artifact = is_artifact(_existing(args.file), "eval")
    if not args.weights and not artifact:
        raise _usage(f"cnnc eval: {args.file} is a .cnn file: give its trained weights with --weights W.npz")
    model = _load_model(args.file, args, diag)
    if not args.weights and not model.carries_weights:
        raise _usage(f"cnnc eval: the artifact {args.file} has no weights (compiled without --weights): "
                     f"give them with --weights W.npz")
    data, path = _dataset(args, model)
    split = "test" if "test" in data else "train"
    x, y = data[split]
    try:
        loss, acc, pred = evaluate(model, x, y)
    except ValueError as e:
        raise _usage(f"cnnc eval: {e}") from None
    k = int(np.prod(model.output_shape))
    conf = confusion_matrix(y, pred, k) if acc is not None else None
    if args.json:
        print(json.dumps({"loss": loss, "accuracy": acc, "n": len(x),
                          "confusion": conf.tolist() if conf is not None else None, "split": split}))
        return 0
    print(f"{model.name} on the {split} split of {path}: {len(x):,} images")
    print(f"loss {loss:.4f}  accuracy {_pct(acc)}  error {_pct(None if acc is None else 1 - acc)}")
    if conf is not None:
        width = max(5, len(str(conf.max())) + 1)
        print("confusion (rows: true class, columns: predicted)")
        print("     " + "".join(f"{j:>{width}}" for j in range(k)))
        for i, row in enumerate(conf):
            print(f"{i:>4} " + "".join(f"{v:>{width}}" for v in row))
    return 0


def cmd_gradcheck(args, diag: Diagnostics) -> int:
    from cnnc.cli import _checked
    from cnnc.gradcheck import gradcheck

    native, ref, rows = gradcheck(_checked(args.file, diag, "gradcheck"), batch=args.batch, seed=args.seed,
                                  loss=args.loss, samples=args.samples)
    print(f"loss: native (float32) {native:.8f}, reference (float64) {ref:.8f}, "
          f"relative difference {abs(native - ref) / max(abs(ref), 1e-12):.2e}")
    width = max(len(r.name) for r in rows) if rows else 9
    print(f"{'parameter':<{width}}  checked  max abs error  max rel error")
    for r in rows:
        print(f"{r.name:<{width}}  {r.checked:>7}  {r.max_abs:>13.2e}  {r.max_rel:>13.2e}")
    if not rows:
        print("no trainable parameters")
        return 0
    worst = max(rows, key=lambda r: r.max_rel)
    print(f"largest relative error: {worst.max_rel:.2e} ({worst.name}); float32 gradients against float64 "
          f"central differences")
    if worst.max_rel > args.tolerance:
        print(f"gradcheck failed: {worst.max_rel:.2e} > {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


def add_commands(sub) -> None:
    from cnnc.cli import integer, path, real

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
                    help="a directory of IDX files (train-images-idx3-ubyte.gz ...) or an .npz with x, y "
                         "(and x_test, y_test); default: the train section's data, relative to FILE")
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
    tr.set_defaults(run=cmd_train)

    ev = sub.add_parser("eval", help="loss, accuracy and confusion matrix on the test split",
                        description="Evaluate trained weights on the test split of the data (the train split "
                                    "when there is no test split).")
    ev.add_argument("file", type=path, help="the .cnn file or artifact")
    ev.add_argument("--weights", type=path, metavar="W.npz",
                    help="the trained weights (required for a .cnn file; default for an artifact: its own)")
    ev.add_argument("--data", type=path, metavar="DIR|FILE.npz")
    ev.add_argument("--json", action="store_true", help='print {"loss", "accuracy", "n", "confusion"}')
    ev.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    ev.set_defaults(run=cmd_eval)

    gc = sub.add_parser("gradcheck", help="native gradients against float64 central differences",
                        description="Compare the native (float32) gradients with central finite differences of "
                                    "an independent float64 numpy evaluation of the same network, on a small "
                                    "random batch, per parameter. Dropout is switched off for the check.")
    gc.add_argument("file", type=path, help="the .cnn file")
    gc.add_argument("--batch", type=integer(1, MAX_GRADCHECK_BATCH), default=4,
                    help=f"images in the random batch, 1 to {MAX_GRADCHECK_BATCH} (default 4)")
    gc.add_argument("--samples", type=count, default=12, help="entries checked per parameter (default 12)")
    gc.add_argument("--loss", choices=["cross_entropy", "mse"], help="default: the train section's loss")
    gc.add_argument("--seed", type=integer(0), default=0)
    gc.add_argument("--tolerance", type=nonneg, default=1e-2, help="exit 1 above this relative error (1e-2)")
    gc.set_defaults(run=cmd_gradcheck)
