"""`cnnc import`: an ONNX model as a readable .cnn file and its weights (needs the `onnx` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnc.cli.common import check_outputs, existing, path, reading, writing
from cnnc.errors import Diagnostics
from cnnc.onnx import require_onnx
from cnnc.pipeline import check_source
from cnnc_runtime.fileio import atomic_save_npz, atomic_write_bytes


def weights_path(output: str) -> str:
    """OUT.cnn -> OUT.weights.npz, beside it."""
    p = Path(output)
    return str(p.with_name((p.stem if p.suffix == ".cnn" else p.name) + ".weights.npz"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("import", help="turn an ONNX model into a .cnn file and its weights",
                        description="Turn an ONNX model (e.g. from torch.onnx.export, either exporter; external "
                                    "data files are read from beside it) into a readable .cnn file and OUT.weights.npz "
                                    "beside it. Nodes cnnc has no layer for are refused by name. Needs pip install "
                                    "'cnnc[onnx]'.")
    im.add_argument("file", type=path, help="the .onnx file")
    im.add_argument("-o", "--output", type=path, required=True, metavar="OUT.cnn", help="the .cnn file to write")
    im.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    from cnnc.onnx.import_ import import_file  # (the op table, networkx: `import cnnc.cli` stays without them)

    require_onnx()  # (before any work: onnx is an optional extra)
    weights = weights_path(args.output)
    check_outputs("import", {"FILE": args.file}, {"-o": args.output, "weights": weights})
    with reading("import", existing(args.file)):
        imported = import_file(args.file)
    check_source(imported.text, args.output, diag)  # (a file cnnc writes must read back; a failure is a bug)
    with writing("import", args.output):
        atomic_write_bytes(args.output, imported.text.encode())
    with writing("import", weights):
        atomic_save_npz(weights, imported.weights)
    print(f"wrote {args.output} and {weights} ({len(imported.weights)} parameter arrays)")
    return 0
