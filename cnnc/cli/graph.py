"""`cnnc graph`: the network's graph as Graphviz DOT."""

from __future__ import annotations

import argparse
import sys

from cnnc.cli.common import check_outputs, path, source_of, writing
from cnnc.errors import Diagnostics
from cnnc.pipeline import Build
from cnnc_runtime.fileio import atomic_write_bytes


def add_parser(sub: argparse._SubParsersAction) -> None:
    gr = sub.add_parser("graph", help="write the network's graph as Graphviz DOT",
                        description="Write the network's graph as Graphviz DOT, each node labelled with its op "
                                    "and output shape.")
    gr.add_argument("file", type=path, help="the .cnn file")
    gr.add_argument("-o", "--output", type=path, metavar="FILE.dot", help="write to a file instead of standard output")
    gr.add_argument("--fused", action="store_true", help="show the graph after fusion")
    gr.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
    check_outputs("graph", {"FILE": args.file}, {"-o": args.output})
    dot = Build(source_of(args.file, "graph"), args.file, diag).dot(optimized=args.fused)
    if args.output:
        with writing("graph", args.output):
            atomic_write_bytes(args.output, dot.encode())
    else:
        sys.stdout.write(dot)
    return 0
