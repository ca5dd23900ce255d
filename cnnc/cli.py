"""The `cnnc` command: check, graph, compile, run, train, eval, gradcheck.

User mistakes in a .cnn file exit with status 1 and a located message; a
missing file or a bad flag exits with status 2 and one line; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from cnnc import __version__
from cnnc.errors import CnnError, Diagnostics


class UsageError(Exception):
    """A bad flag or a missing file: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"cnnc: {path}: no such file")
    return p


def _checked(path: str, diag: Diagnostics):
    from cnnc.driver import check_file

    return check_file(_existing(path), diag)


def cmd_check(args, diag: Diagnostics) -> int:
    from cnnc import summary
    from cnnc.driver import optimize

    g = _checked(args.file, diag)
    if args.json:
        print(json.dumps(summary.as_json(g), indent=2))
    else:
        print(summary.as_text(g, summary.fused_groups(optimize(g))))
    return 0


def cmd_graph(args, diag: Diagnostics) -> int:
    from cnnc import summary
    from cnnc.driver import optimize

    g = _checked(args.file, diag)
    if args.fused:
        g = optimize(g)
    dot = summary.as_dot(g)
    if args.output:
        from cnnc_runtime.fileio import atomic_write_bytes

        atomic_write_bytes(args.output, dot.encode())
    else:
        sys.stdout.write(dot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cnnc", description="A compiler for convolutional neural networks written in .cnn files.")
    p.add_argument("--version", action="version", version=f"cnnc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("check", help="check a .cnn file and print its layers, shapes, parameters and MACs",
                       description="Check a .cnn file: every shape, parameter count and MAC count, like Keras' "
                                   "model.summary(). Layers that will run as one fused kernel are bracketed.")
    c.add_argument("file", help="the .cnn file")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(run=cmd_check)

    gr = sub.add_parser("graph", help="write the network's graph as Graphviz DOT",
                        description="Write the network's graph as Graphviz DOT, each node labelled with its op "
                                    "and output shape.")
    gr.add_argument("file", help="the .cnn file")
    gr.add_argument("-o", "--output", metavar="FILE.dot", help="write to a file instead of standard output")
    gr.add_argument("--fused", action="store_true", help="show the graph after fusion")
    gr.set_defaults(run=cmd_graph)
    return p


def main(argv: list[str] | None = None) -> int:
    diag = Diagnostics()
    run: Callable | None = None
    try:
        args = build_parser().parse_args(argv)
        run = getattr(args, "run", None)
        if run is None:
            build_parser().print_help()
            return 2
        status = run(args, diag)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except CnnError as e:
        for w in diag.render():
            print(w, file=sys.stderr)
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cnnc: interrupted", file=sys.stderr)
        return 130
    for w in diag.render():
        print(w, file=sys.stderr)
    return status
