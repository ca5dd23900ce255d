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


def _load_model(path: str, args, diag: Diagnostics, **options):
    """A Model from a .cnn file (compiled here) or an artifact (``cnnc compile -o``)."""
    import cnnc
    from cnnc_runtime import artifact

    p = _existing(path)
    with open(p, "rb") as f:
        is_artifact = f.read(len(artifact.MAGIC)) == artifact.MAGIC
    if is_artifact:
        try:
            model = cnnc.load(p)
        except ValueError as e:  # damaged, or built for another CPU or cnnc
            raise UsageError(f"cnnc {args.command}: {e}") from None
    else:
        from cnnc.cache import compile_source
        from cnnc.sources import read_source
        from cnnc_runtime.model import Model

        manifest, obj = compile_source(read_source(p), str(path), generic=getattr(args, "generic", False),
                                       use_cache=not getattr(args, "no_cache", False), diag=diag)
        model = Model(manifest, obj, **options)
    weights = getattr(args, "weights", None)
    if weights:
        _load_weights(model, weights, args.command)
    return model


def _load_weights(model, path: str, command: str) -> None:
    try:
        model.load(_existing(path))
    except ValueError as e:
        raise UsageError(f"cnnc {command}: {e}") from None


def cmd_compile(args, diag: Diagnostics) -> int:
    from cnnc.codegen.target import emit_assembly_all, generic_target, host_target
    from cnnc.compiler import compile_graph
    from cnnc.driver import optimize
    from cnnc.passes import PASS_NAMES

    g = _checked(args.file, diag)
    if args.dump_after:
        if args.dump_after not in PASS_NAMES:
            raise UsageError(f"cnnc compile: unknown pass '{args.dump_after}'; passes: {', '.join(PASS_NAMES)}")
        from cnnc.passes import CHECK, run_passes
        from cnnc.summary import as_listing

        def show(name, graph):
            if name == args.dump_after:
                print(f"; graph after pass '{name}'")
                print(as_listing(graph))

        from cnnc.frontend import load_graph, read_source

        checked = run_passes(load_graph(read_source(args.file), args.file, Diagnostics()), CHECK, show)
        optimize(checked, show)
        return 0
    if args.emit == "dot":
        from cnnc import summary

        sys.stdout.write(summary.as_dot(optimize(g)))
        return 0
    target = generic_target() if args.generic else host_target()
    compiled = compile_graph(g, target, use_cache=not args.no_cache, keep_module=args.emit is not None)
    if args.emit == "llvm":
        sys.stdout.write("\n".join(str(m) for m in compiled.modules))
        return 0
    if args.emit == "asm":
        sys.stdout.write(emit_assembly_all(compiled.modules, target))
        return 0
    from cnnc_runtime.model import Model

    out = args.output or str(Path(args.file).with_suffix(".cnnc"))
    model = Model(compiled.manifest, compiled.obj)
    if args.weights:
        _load_weights(model, args.weights, "compile")
    model.save_artifact(out, with_weights=bool(args.weights))
    print(f"wrote {out} ({Path(out).stat().st_size:,} bytes, {target.cpu}, network {model.name})")
    return 0


def cmd_run(args, diag: Diagnostics) -> int:
    import numpy as np

    model = _load_model(args.file, args, diag)
    try:
        x = np.load(_existing(args.input), allow_pickle=False)
    except ValueError as e:
        raise UsageError(f"cnnc run: {args.input}: not a .npy array ({e})") from None
    try:
        y = model(x)
    except ValueError as e:
        raise UsageError(f"cnnc run: {args.input}: {e}") from None
    if args.output:
        from cnnc_runtime.fileio import atomic_write

        atomic_write(args.output, lambda f: np.save(f, y))
        print(f"wrote {args.output}: {y.shape[0]} outputs of shape {y.shape[1:]}")
    else:
        np.set_printoptions(precision=5, suppress=True, linewidth=120, threshold=2000)
        print(y)
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

    co = sub.add_parser("compile", help="compile to a native artifact, or print the LLVM IR, assembly or graph",
                        description="Compile a .cnn file for this CPU into one artifact file (native code, manifest "
                                    "and optionally weights) that `cnnc run` and cnnc.load() run without the "
                                    "compiler front end.")
    co.add_argument("file", help="the .cnn file")
    co.add_argument("-o", "--output", metavar="OUT", help="artifact path (default: FILE with suffix .cnnc)")
    co.add_argument("--weights", metavar="W.npz", help="store these weights in the artifact")
    co.add_argument("--emit", choices=["llvm", "asm", "dot"], help="print the LLVM IR, the assembly or the graph")
    co.add_argument("--dump-after", metavar="PASS", help="print the graph after a pass (prune, shapes, counts, fuse)")
    co.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    co.add_argument("--generic", action="store_true", help="target baseline x86-64 instead of this CPU")
    co.set_defaults(run=cmd_compile)

    ru = sub.add_parser("run", help="run a network on an array saved with numpy.save",
                        description="Run a network (a .cnn file or a compiled artifact) on a .npy array of "
                                    "shape (N, C, H, W) or (N, F) and print or save the outputs.")
    ru.add_argument("file", help="the .cnn file or artifact")
    ru.add_argument("--input", required=True, metavar="X.npy", help="the input batch")
    ru.add_argument("--weights", metavar="W.npz", help="weights saved by `cnnc train -o` or model.save()")
    ru.add_argument("-o", "--output", metavar="Y.npy", help="save the outputs instead of printing them")
    ru.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    ru.set_defaults(run=cmd_run)

    from cnnc.train_cli import add_commands

    add_commands(sub)
    return p


def _check_environment() -> None:
    """A bad CNNC_THREADS is one line of error before any work, not a traceback when a model is made."""
    from cnnc_runtime.parallel import default_threads

    try:
        default_threads()
    except ValueError as e:
        raise UsageError(f"cnnc: error: {e}") from None


def main(argv: list[str] | None = None) -> int:
    diag = Diagnostics()
    run: Callable | None = None
    try:
        args = build_parser().parse_args(argv)
        run = getattr(args, "run", None)
        if run is None:
            build_parser().print_help()
            return 2
        _check_environment()
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
    except BrokenPipeError:  # `cnnc ... | head`: the reader left; say nothing more
        sys.stderr.close()
        return 0
    for w in diag.render():
        print(w, file=sys.stderr)
    return status
