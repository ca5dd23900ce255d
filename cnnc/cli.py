"""The `cnnc` command: check, graph, compile, run, train, eval, gradcheck.

User mistakes in a .cnn file exit with status 1 and a located message; a
missing or unreadable file, an output that cannot be written and a bad flag
exit with status 2 and one line. A traceback means a bug in cnnc: it is shown,
with a line saying so, and the status is 70 (EX_SOFTWARE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnc import __version__
from cnnc.errors import CnnError, Diagnostics

BUG_STATUS = 70
FLOAT32_MAX = 3.4028234663852886e38
MAX_MESSAGE = 1000  # characters of an error line; a hostile file's text must not flood the terminal


class UsageError(Exception):
    """A bad flag, a missing or unreadable file, an unwritable output: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, status 2 (argparse prints usage too)
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


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
            raise argparse.ArgumentTypeError(f"expected {what}, got '{_clip(text, 40)}'")
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
            raise argparse.ArgumentTypeError(f"expected {what}, got '{_clip(text, 40)}'")
        return value

    return parse


def path(text: str) -> str:
    """An argparse type: a file name, which an empty string is not (it would mean the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    return text


# ---- input files -----------------------------------------------------------------------------------


def _existing(path: str) -> Path:
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


def _checked(path: str, diag: Diagnostics, command: str = "check"):
    from cnnc.driver import check_source
    from cnnc.sources import read_source

    p = _existing(path)
    if is_artifact(p, command):
        raise UsageError(f"cnnc {command}: {path} is a compiled artifact; this command needs the .cnn source")
    with reading(command, p):
        source = read_source(p)
    return check_source(source, str(p), diag)


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


# ---- commands --------------------------------------------------------------------------------------


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

    check_outputs("graph", {"FILE": args.file}, {"-o": args.output})
    g = _checked(args.file, diag, "graph")
    if args.fused:
        g = optimize(g)
    dot = summary.as_dot(g)
    if args.output:
        from cnnc_runtime.fileio import atomic_write_bytes

        with writing("graph", args.output):
            atomic_write_bytes(args.output, dot.encode())
    else:
        sys.stdout.write(dot)
    return 0


def is_artifact(path: Path, command: str) -> bool:
    from cnnc_runtime import artifact

    with reading(command, path), open(path, "rb") as f:
        return f.read(len(artifact.MAGIC)) == artifact.MAGIC


def _load_artifact(path: Path, command: str, key: str | None = None):
    import cnnc

    try:
        with reading(command, path):
            return cnnc.load(path, key=key)
    except ValueError as e:  # damaged, hand-edited, unsigned or tampered with, or built for another CPU or cnnc
        raise UsageError(f"cnnc {command}: {e}") from None


def _load_model(path: str, args, diag: Diagnostics, **options):
    """A Model from a .cnn file (compiled here) or an artifact (``cnnc compile -o``)."""
    p = _existing(path)
    key = getattr(args, "key", None)
    compiled_already = is_artifact(p, args.command)
    if key and not compiled_already:
        raise UsageError(f"cnnc {args.command}: --key checks an artifact's signature, but {path} is not an artifact")
    if compiled_already:
        model = _load_artifact(p, args.command, key)
    else:
        from cnnc.pipeline import compile_source
        from cnnc.sources import read_source
        from cnnc_runtime.model import Model

        with reading(args.command, p):
            source = read_source(p)
        manifest, obj = compile_source(source, str(path), generic=getattr(args, "generic", False),
                                       use_cache=not getattr(args, "no_cache", False), diag=diag)
        model = Model(manifest, obj, **options)
    weights = getattr(args, "weights", None)
    if weights:
        _load_weights(model, weights, args.command)
    return model


def _load_weights(model, path: str, command: str) -> None:
    import zipfile

    p = _existing(path)
    with reading(command, p):
        if not zipfile.is_zipfile(p):  # a .npy or any other file: model.load wants the .npz that save() writes
            raise UsageError(f"cnnc {command}: {path}: not a weights file (an .npz written by `cnnc train -o` "
                             f"or model.save())")
        try:
            model.load(p)
        except ValueError as e:
            raise UsageError(f"cnnc {command}: {e}") from None


def cmd_compile(args, diag: Diagnostics) -> int:
    from cnnc.codegen.target import emit_assembly_all, generic_target, host_target
    from cnnc.compiler import compile_graph
    from cnnc.driver import optimize
    from cnnc.passes import PASS_NAMES

    writes = not args.dump_after and args.emit is None
    printed = [flag for flag, v in (("--emit", args.emit), ("--dump-after", args.dump_after)) if v]
    ignored = [flag for flag, v in (("-o", args.output), ("--weights", args.weights)) if v]
    if len(printed) > 1 or (printed and ignored):
        raise UsageError(f"cnnc compile: {' and '.join(printed + ignored)} do not go together: --emit and "
                         f"--dump-after print to standard output instead of writing an artifact")
    out = args.output or str(Path(args.file).with_suffix(".cnnc"))
    if writes:
        check_outputs("compile", {"FILE": args.file, "--weights": args.weights},
                      {"-o" if args.output else "the default output (FILE.cnnc)": out})
    g = _checked(args.file, diag, "compile")
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

        with reading("compile", args.file):
            source = read_source(args.file)
        checked = run_passes(load_graph(source, args.file, Diagnostics()), CHECK, show)
        optimize(checked, show)
        return 0
    if args.emit == "dot":
        from cnnc import summary

        sys.stdout.write(summary.as_dot(optimize(g)))
        return 0
    key = _signing_key(args.sign) if args.sign else None
    target = generic_target() if args.generic else host_target()
    compiled = compile_graph(g, target, use_cache=not args.no_cache, keep_module=args.emit is not None)
    if args.emit == "llvm":
        sys.stdout.write("\n".join(str(m) for m in compiled.modules))
        return 0
    if args.emit == "asm":
        sys.stdout.write(emit_assembly_all(compiled.modules, target))
        return 0
    from cnnc_runtime.model import Model

    model = Model(compiled.manifest, compiled.obj)
    if args.weights:
        _load_weights(model, args.weights, "compile")
    with writing("compile", out):
        model.save_artifact(out, with_weights=bool(args.weights), key=key)
    signed = ", signed" if key else ""
    print(f"wrote {out} ({Path(out).stat().st_size:,} bytes, {target.cpu}, network {model.name}{signed})")
    return 0


def _signing_key(path: str) -> bytes:
    from cnnc_runtime.signing import read_key

    try:
        return read_key(path)
    except ValueError as e:
        raise UsageError(f"cnnc compile: --sign: {e}") from None


TRUST = ("An artifact is native code: loading it runs it with your rights, as a shared library would. Run only "
         "artifacts you built or whose signature you checked with --key.")


def cmd_run(args, diag: Diagnostics) -> int:
    import numpy as np

    check_outputs("run", {"FILE": args.file, "--input": args.input, "--weights": args.weights}, {"-o": args.output})
    model = _load_model(args.file, args, diag)
    x_path = _existing(args.input)
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
        from cnnc_runtime.fileio import atomic_write

        with writing("run", args.output):
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
    c.add_argument("file", type=path, help="the .cnn file")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(run=cmd_check)

    gr = sub.add_parser("graph", help="write the network's graph as Graphviz DOT",
                        description="Write the network's graph as Graphviz DOT, each node labelled with its op "
                                    "and output shape.")
    gr.add_argument("file", type=path, help="the .cnn file")
    gr.add_argument("-o", "--output", type=path, metavar="FILE.dot", help="write to a file instead of standard output")
    gr.add_argument("--fused", action="store_true", help="show the graph after fusion")
    gr.set_defaults(run=cmd_graph)

    co = sub.add_parser("compile", help="compile to a native artifact, or print the LLVM IR, assembly or graph",
                        description="Compile a .cnn file for this CPU into one artifact file (native code, manifest "
                                    "and optionally weights) that `cnnc run` and cnnc.load() run without the "
                                    "compiler front end. No command writes over one of its input files. " + TRUST
                                    + " --sign KEYFILE adds an HMAC-SHA256 of the whole artifact made with the key in "
                                    "KEYFILE (at least 16 bytes, e.g. `head -c 32 /dev/urandom > KEYFILE`; keep it "
                                    "secret).")
    co.add_argument("file", type=path, help="the .cnn file")
    co.add_argument("-o", "--output", type=path, metavar="OUT", help="artifact path (default: FILE with suffix .cnnc)")
    co.add_argument("--weights", type=path, metavar="W.npz", help="store these weights in the artifact")
    co.add_argument("--emit", choices=["llvm", "asm", "dot"], help="print the LLVM IR, the assembly or the graph")
    co.add_argument("--dump-after", metavar="PASS", help="print the graph after a pass (prune, shapes, counts, fuse)")
    co.add_argument("--no-cache", action="store_true", help="do not use the compile cache")
    co.add_argument("--generic", action="store_true", help="target baseline x86-64 instead of this CPU")
    co.add_argument("--sign", metavar="KEYFILE", help="sign the artifact with the secret key in KEYFILE "
                                                       "(checked by `cnnc run --key` and cnnc.load(..., key=))")
    co.set_defaults(run=cmd_compile)

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
        raise UsageError(f"cnnc: {e}") from None


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(e: BaseException) -> str:
    from cnnc_runtime.fileio import WriteError  # (the runtime's file layer: loaded only on this error path)

    if isinstance(e, WriteError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status: 0, 1 (an error in the .cnn file), 2 (a usage error), 70 (a bug)."""
    diag = Diagnostics()
    prefix = "cnnc"
    try:
        args = build_parser().parse_args(argv)
        run = getattr(args, "run", None)
        if run is None:
            build_parser().print_help()
            return 2
        prefix = f"cnnc {args.command}"
        _check_environment()
        status = run(args, diag)
    except UsageError as e:
        print(_clip(str(e)), file=sys.stderr)
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
    except (ValueError, OSError) as e:  # bad input found by a layer below (a file, a value): the user's to fix
        print(_clip(f"{prefix}: {_describe(e)}"), file=sys.stderr)
        return 2
    except Exception:  # anything else is a bug: keep the traceback for the report, and say whose fault it is
        traceback.print_exc()
        print(f"{prefix}: internal error: this is a bug in cnnc; please report it with the command line and the "
              f"traceback above", file=sys.stderr)
        return BUG_STATUS
    for w in diag.render():
        print(w, file=sys.stderr)
    return status
