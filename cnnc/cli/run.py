"""`cnnc run`: a network (a .cnn file or an artifact) on an array saved with numpy.save."""

from __future__ import annotations

import argparse

import numpy as np

from cnnc.cli.common import TRUST, UsageError, check_outputs, existing, load_model, path, reading, writing
from cnnc.errors import Diagnostics
from cnnc_runtime.fileio import atomic_write


def add_parser(sub: argparse._SubParsersAction) -> None:
    ru = sub.add_parser("run", help="run a network on an array saved with numpy.save",
                        description="Run a network (a .cnn file or a compiled artifact) on a .npy array of "
                                    "shape (N, C, H, W) or (N, F) and print or save the outputs. " + TRUST)
    ru.add_argument("file", type=path, help="the .cnn file or artifact")
    ru.add_argument("--input", type=path, required=True, metavar="X.npy", help="the input batch")
    ru.add_argument("--weights", type=path, metavar="W.npz",
                    help="weights saved by `cnnc train -o` or model.save() (default: the artifact's, if it has them)")
    ru.add_argument("-o", "--output", type=path, metavar="Y.npy", help="save the outputs instead of printing them")
    ru.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    ru.add_argument("--key", metavar="KEYFILE", help="refuse the artifact unless it was signed with the key in "
                                                     "KEYFILE (`cnnc compile --sign KEYFILE`)")
    ru.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    check_outputs("run", {"FILE": args.file, "--input": args.input, "--weights": args.weights}, {"-o": args.output})
    model = load_model(args.file, args, diag)
    x_path = existing(args.input)
    with reading("run", x_path), open(x_path, "rb") as f:
        if f.read(2) == b"PK":
            raise UsageError(f"cnnc run: {args.input}: an .npz archive; --input takes one array saved by numpy.save")
    try:
        with reading("run", x_path):  # mapped, not read: a header claiming more data than the file has is refused
            x = np.array(np.load(x_path, mmap_mode="r", allow_pickle=False))
    except (ValueError, EOFError) as e:
        raise UsageError(f"cnnc run: {args.input}: not a .npy array ({e})") from None
    try:
        y = model(x)
    except ValueError as e:
        raise UsageError(f"cnnc run: {args.input}: {e}") from None
    if args.output:
        with writing("run", args.output):
            atomic_write(args.output, lambda f: np.save(f, y))
        print(f"wrote {args.output}: {y.shape[0]} outputs of shape {y.shape[1:]}")
    else:
        np.set_printoptions(precision=5, suppress=True, linewidth=120, threshold=2000)
        print(y)
    return 0
