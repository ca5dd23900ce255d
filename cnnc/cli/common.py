"""What the commands share: usage errors, flag types, input and output files, loading a model or a dataset.

Every command module (``cnnc.cli.check``, ``cnnc.cli.train``, ...) uses these
and nothing of another command's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import cnnc
from cnnc.errors import Diagnostics
from cnnc.pipeline import compile_model, read_source
from cnnc_runtime import artifact
from cnnc_runtime.data import CIFAR_FILES, IDX_FILES, MissingDependency, load_dataset
from cnnc_runtime.model import Model, load

FLOAT32_MAX = 3.4028234663852886e38
MAX_MESSAGE = 1000  # characters of an error line; a hostile file's text must not flood the terminal
TRUST = ("An artifact is native code: loading it runs it with your rights, as a shared library would. Run only "
         "artifacts you built or whose signature you checked with --key.")


class UsageError(Exception):
    """A bad flag, a missing or unreadable file, an unwritable output: exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- flag values -----------------------------------------------------------------------------------


def integer(minimum: int, maximum: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [minimum, maximum]."""
    what = what or ("a positive integer" if minimum == 1 and maximum is None
                    else "a non-negative integer" if minimum == 0 and maximum is None
                    else f"an integer from {minimum} to {maximum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{clip(text, 40)}'")
        return value

    return parse


def real(low: float, high: float | None = None, *, above: bool = False, below: bool = False,
         what: str = "a number") -> Callable[[str], float]:
    """An argparse type: a number in [low, high], the ends open when `above` / `below`, finite in float32 (the
    precision the native code computes in)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = abs(value) <= FLOAT32_MAX and (value > low if above else value >= low)
        if high is not None:
            ok = ok and (value < high if below else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{clip(text, 40)}'")
        return value

    return parse


def path(text: str) -> str:
    """An argparse type: a file name, which an empty string is not (it would mean the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    return text


# ---- input files -----------------------------------------------------------------------------------


def existing(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"cnnc: {path}: is a directory, not a file")
    if not p.exists():
        raise UsageError(f"cnnc: {path}: no such file")
    if not p.is_file():
        raise UsageError(f"cnnc: {path}: not a regular file")
    return p


@contextlib.contextmanager
def reading(command: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """OSError and undecodable text while reading `path` become one line."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UsageError(f"cnnc {command}: cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cnnc {command}: cannot read {path}: {e.strerror or e}") from None


# ---- output files ----------------------------------------------------------------------------------


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (yet)
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return os.path.abspath(a) == os.path.abspath(b)


def _write_problem(path: str, replaced: bool) -> str | None:
    """Why `path` cannot be written, or None. `replaced`: written by a temporary file renamed over it (atomic
    writes), else opened for appending."""
    p = Path(os.path.abspath(path))
    if p.is_dir():
        return "is a directory"
    if replaced and p.exists() and not p.is_file():
        return "not a regular file (an output replaces the file at this path)"
    if not p.parent.is_dir():
        return f"no such directory {p.parent}" if not p.parent.exists() else f"{p.parent} is not a directory"
    if p.exists() and not replaced:
        return None if os.access(p, os.W_OK) else "permission denied"
    try:  # the one sure test: can a file be created there? (os.access says yes to root on a read-only mount)
        with tempfile.TemporaryFile(dir=p.parent):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_outputs(command: str, inputs: dict[str, str | None], outputs: dict[str, str | None],
                  appended: tuple[str, ...] = (), may_replace: tuple[tuple[str, str], ...] = ()) -> None:
    """Refuse, before any work, an output that is one of the inputs, another output, or cannot be written.

    `inputs` and `outputs` map a label (the flag, or "FILE") to a path (None: not given); `appended` are the
    labels of outputs opened for appending; `may_replace` lists (output, input) pairs that are meant to be the
    same file (a checkpoint resumed and written again).
    """
    given = {label: p for label, p in outputs.items() if p is not None}
    for label, path in given.items():
        for in_label, in_path in inputs.items():
            if in_path is not None and (label, in_label) not in may_replace and _same_file(path, in_path):
                raise UsageError(f"cnnc {command}: {label} {path} would overwrite the input {in_label} {in_path}; "
                                 f"write the output somewhere else")
    labels = list(given)
    for i, label in enumerate(labels):
        for other in labels[i + 1:]:
            if _same_file(given[label], given[other]):
                raise UsageError(f"cnnc {command}: {label} and {other} are the same file {given[label]}; "
                                 f"give them different paths")
    for label, path in given.items():
        problem = _write_problem(path, replaced=label not in appended)
        if problem:
            raise UsageError(f"cnnc {command}: cannot write {path} ({label}): {problem}")


@contextlib.contextmanager
def writing(command: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a vanished directory) becomes one line."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"cnnc {command}: cannot write {path}: {e.strerror or e}") from None



# ---- models --------------------------------------------------------------------------------------


def is_artifact(path: Path, command: str) -> bool:
    with reading(command, path), open(path, "rb") as f:
        return f.read(len(artifact.MAGIC)) == artifact.MAGIC


def source_of(path: str, command: str) -> str:
    """The text of a .cnn file named on the command line (an artifact, or a file that cannot be read, is refused)."""
    p = existing(path)
    if is_artifact(p, command):
        raise UsageError(f"cnnc {command}: {path} is a compiled artifact; this command needs the .cnn source")
    with reading(command, p):
        return read_source(p)


def _load_artifact(path: Path, command: str, key: str | None = None) -> Model:
    try:
        with reading(command, path):
            return load(path, key=key)
    except ValueError as e:  # damaged, hand-edited, unsigned or tampered with, or built for another CPU or cnnc
        raise UsageError(f"cnnc {command}: {e}") from None


def load_model(path: str, args: argparse.Namespace, diag: Diagnostics, **options) -> Model:
    """A Model from a .cnn file (compiled here), an ONNX file (imported with its weights, then compiled; the onnx
    extra) or an artifact (``cnnc compile -o``)."""
    p = existing(path)
    key = getattr(args, "key", None)
    compiled_already = is_artifact(p, args.command)
    if key and not compiled_already:
        raise UsageError(f"cnnc {args.command}: --key checks an artifact's signature, but {path} is not an artifact")
    if compiled_already:
        model = _load_artifact(p, args.command, key)
    elif p.suffix.lower() == ".onnx":  # (cnnc import, then compile: the network with its weights)
        model = cnnc.compile(p, generic=getattr(args, "generic", False),
                             cache=not getattr(args, "no_cache", False), **options)
    else:
        with reading(args.command, p):
            source = read_source(p)
        model = compile_model(source, str(path), generic=getattr(args, "generic", False),
                              use_cache=not getattr(args, "no_cache", False), diag=diag, **options)
    weights = getattr(args, "weights", None)
    if weights:
        load_weights(model, weights, args.command)
    return model


def load_weights(model: Model, path: str, command: str) -> None:
    p = existing(path)
    with reading(command, p):
        if not zipfile.is_zipfile(p):  # a .npy or any other file: model.load wants the .npz that save() writes
            raise UsageError(f"cnnc {command}: {path}: not a weights file (an .npz written by `cnnc train -o` "
                             f"or model.save())")
        try:
            model.load(p)
        except ValueError as e:
            raise UsageError(f"cnnc {command}: {e}") from None


# ---- datasets ------------------------------------------------------------------------------------


def data_path(args: argparse.Namespace, model: Model) -> Path:
    """--data, else the train section's `data`, relative to the .cnn file."""
    if args.data:
        return Path(args.data)
    rel = model.manifest.get("train", {}).get("data")
    if rel is None:
        raise UsageError(f"cnnc {args.command}: no data; give --data DIR|FILE.npz or write "
                         f'data "PATH" in the train section of {args.file}')
    return Path(args.file).parent / rel


def data_inputs(path: str | Path | None, label: str = "--data") -> dict[str, str | None]:
    """The files a dataset path stands for (a directory: its IDX or CIFAR-10 files), labelled for `check_outputs`."""
    files: dict[str, str | None] = {label: None if path is None else str(path)}
    if path is not None and Path(path).is_dir():
        for stem in (s for pair in IDX_FILES.values() for s in pair):
            for name in (stem, stem + ".gz"):
                files[f"{label} file {name}"] = str(Path(path) / name)
        for name in (f for names in CIFAR_FILES.values() for f in names):
            files[f"{label} file {name}"] = str(Path(path) / name)
    return files


def dataset(args: argparse.Namespace, model: Model, subset: int = 0) -> tuple[dict[str, tuple], Path]:
    """{split: (inputs, targets)}: each split's images as an ``Inputs`` set (fit and evaluate prepare each batch
    by the runtime's one input rule, as they do for Python callers; uint8 images stay as stored).

    `subset` > 0 keeps the first `subset` training images (a view, before anything is prepared)."""
    path = data_path(args, model)
    try:
        splits = load_dataset(path, raw=True)
        if subset:
            train = splits["train"]
            splits["train"] = dataclasses.replace(train, x=train.x[:subset], y=train.y[:subset])
        return {name: (model.inputs(d.x), d.y) for name, d in splits.items()}, path
    except (OSError, ValueError, MissingDependency) as e:
        raise UsageError(f"cnnc {args.command}: {e}") from None
    except MemoryError:  # sizes in a file's headers are the file's word, not cnnc's
        raise UsageError(f"cnnc {args.command}: {path}: too large to load into memory") from None


def percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"
