"""The command line's top level: the parser built from the command modules, and what an escaping error becomes."""

from __future__ import annotations

import argparse
import sys
import traceback

from cnnc.cli import check, export, gradcheck, graph, import_, profile, run, train
from cnnc.cli import compile as compile_command
from cnnc.cli import eval as eval_command
from cnnc.cli.common import Parser, UsageError, clip
from cnnc.errors import CnnError, Diagnostics
from cnnc_runtime import __version__
from cnnc_runtime.fileio import WriteError
from cnnc_runtime.parallel import default_threads

BUG_STATUS = 70
# in the order `cnnc --help` lists them
COMMANDS = (check, graph, compile_command, run, train, eval_command, profile, gradcheck, export, import_)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cnnc", description="A compiler for convolutional neural networks written in .cnn files.")
    p.add_argument("--version", action="version", version=f"cnnc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _check_environment() -> None:
    """A bad CNNC_THREADS is one line of error before any work, not a traceback when a model is made."""
    try:
        default_threads()
    except ValueError as e:
        raise UsageError(f"cnnc: {e}") from None


def _describe(e: BaseException) -> str:
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
        print(clip(str(e)), file=sys.stderr)
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
        print(clip(f"{prefix}: {_describe(e)}"), file=sys.stderr)
        return 2
    except Exception:  # anything else is a bug: keep the traceback for the report, and say whose fault it is
        traceback.print_exc()
        print(f"{prefix}: internal error: this is a bug in cnnc; please report it with the command line and the "
              f"traceback above", file=sys.stderr)
        return BUG_STATUS
    for w in diag.render():
        print(w, file=sys.stderr)
    return status
