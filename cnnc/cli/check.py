"""`cnnc check`: every layer's shape, parameters and MACs, like Keras' model.summary()."""

from __future__ import annotations

import argparse
import json

from cnnc.cli.common import path, source_of
from cnnc.errors import Diagnostics
from cnnc.pipeline import Build


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("check", help="check a .cnn file and print its layers, shapes, parameters and MACs",
                       description="Check a .cnn file: every shape, parameter count and MAC count, like Keras' "
                                   "model.summary(). Layers that will run as one fused kernel are bracketed.")
    c.add_argument("file", type=path, help="the .cnn file")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    summary = Build(source_of(args.file, "check"), args.file, diag).description()  # as the compile's manifest has it
    if args.json:
        print(json.dumps(summary["summary_json"], indent=2))
    else:
        print(summary["summary"])
    return 0
