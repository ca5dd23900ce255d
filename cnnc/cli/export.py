"""`cnnc export`: a network and its weights as an ONNX file (needs the `onnx` extra)."""

from __future__ import annotations

import argparse

from cnnc.cli.common import TRUST, check_outputs, load_model, path, writing
from cnnc.errors import Diagnostics
from cnnc.onnx import require_onnx
from cnnc_runtime.onnx_export import OPSET


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="write a network and its weights as an ONNX file",
                        description="Write a network (a .cnn file or an artifact) and its weights as an ONNX model "
                                    "(opset 17), one node per layer with cnnc's layer names, checked with ONNX's "
                                    "full checker and strict shape inference. Needs pip install 'cnnc[onnx]'. "
                                    + TRUST)
    ex.add_argument("file", type=path, help="the .cnn file or artifact")
    ex.add_argument("--weights", type=path, metavar="W.npz",
                    help="weights saved by `cnnc train -o` or model.save() (default: the artifact's, else the "
                         "initial weights)")
    ex.add_argument("-o", "--output", type=path, required=True, metavar="MODEL.onnx", help="the ONNX file to write")
    ex.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    ex.add_argument("--key", metavar="KEYFILE", help="refuse the artifact unless it was signed with the key in "
                                                     "KEYFILE (`cnnc compile --sign KEYFILE`)")
    ex.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    require_onnx()  # (before any work: onnx is an optional extra)
    check_outputs("export", {"FILE": args.file, "--weights": args.weights}, {"-o": args.output})
    model = load_model(args.file, args, diag)
    with writing("export", args.output):
        model.export_onnx(args.output)
    print(f"wrote {args.output}: network {model.name}, {len(model.params)} parameter arrays, ONNX opset {OPSET}")
    return 0
