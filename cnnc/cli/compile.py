"""`cnnc compile`: a native artifact, or the LLVM IR, the assembly or a pass's graph printed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cnnc.cli.common import TRUST, UsageError, check_outputs, load_weights, path, source_of, writing
from cnnc.codegen.target import emit_assembly_all, generic_target, host_target
from cnnc.errors import Diagnostics
from cnnc.pipeline import Build, listing, pass_names
from cnnc_runtime.model import Model
from cnnc_runtime.signing import read_key

if TYPE_CHECKING:
    import networkx as nx


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    co.set_defaults(run=run)


def run(args: argparse.Namespace, diag: Diagnostics) -> int:
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

    def show(name: str, graph: nx.DiGraph) -> None:
        if name == args.dump_after:
            print(f"; graph after pass '{name}'")
            print(listing(graph))

    build = Build(source_of(args.file, "compile"), args.file, diag, after=show if args.dump_after else None)
    build.checked()  # a mistake in the file is reported before a mistake in the flags
    if args.dump_after:
        if args.dump_after not in pass_names():
            raise UsageError(f"cnnc compile: unknown pass '{args.dump_after}'; passes: {', '.join(pass_names())}")
        build.optimized()  # (each pass prints through `show` as it runs)
        return 0
    if args.emit == "dot":
        sys.stdout.write(build.dot(optimized=True))
        return 0
    key = _signing_key(args.sign) if args.sign else None
    target = generic_target() if args.generic else host_target()
    compiled = build.compiled(target, use_cache=not args.no_cache, keep_module=args.emit is not None)
    if args.emit == "llvm":
        sys.stdout.write("\n".join(str(m) for m in compiled.modules))
        return 0
    if args.emit == "asm":
        sys.stdout.write(emit_assembly_all(compiled.modules, target))
        return 0
    model = Model(compiled.manifest, compiled.obj)
    if args.weights:
        load_weights(model, args.weights, "compile")
    with writing("compile", out):
        model.save_artifact(out, with_weights=bool(args.weights), key=key)
    signed = ", signed" if key else ""
    print(f"wrote {out} ({Path(out).stat().st_size:,} bytes, {target.cpu}, network {model.name}{signed})")
    return 0


def _signing_key(path: str) -> bytes:
    try:
        return read_key(path)
    except ValueError as e:
        raise UsageError(f"cnnc compile: --sign: {e}") from None
