"""Whether a change to the compiler left the machine code as it was: each function's instructions, compared.

    python benchmarks/machine_code.py dump OUT.json [FILE ...]   # with the code before the change
    python benchmarks/machine_code.py dump NEW.json [FILE ...]   # ... and after it (another checkout or venv)
    python benchmarks/machine_code.py compare OUT.json NEW.json

A change meant to make compiling cheaper (smaller IR for the same code, other
pass settings, modules grouped differently) needs no speed measurement when
every function's instructions are the same: the only check a machine as
loaded as this project's can give exactly. ``dump`` compiles each network
(default: every example; the host target, Winograd on) as ``cnnc.compile``
does and writes LLVM's assembly of each function, local labels and
constant-pool names made alike (their numbers follow a function's place in
its module: ``cnnc.codegen.target.function_assembly``, so both builds need it);
``compare`` names the functions whose instructions differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dump(files: list[str]) -> dict[str, dict[str, list[str]]]:
    from cnnc import pipeline
    from cnnc.codegen import target as tg
    from cnnc.codegen.module import build_module

    t = tg.host_target()
    tm = t.machine()
    networks = {}
    for f in files:
        fused = pipeline.Build(pipeline.read_source(f), f).optimized()
        modules, _ = build_module(fused, t.vector_width)
        units = tg.units(modules) if hasattr(tg, "units") else modules  # (before the grouping: one per module)
        functions: dict[str, list[str]] = {}
        for unit in units:
            functions.update(tg.function_assembly(tm.emit_assembly(tg._prepared(unit, t, tm))))
        networks[Path(f).stem] = functions
        print(f"{f}: {len(functions)} functions, {sum(map(len, functions.values()))} instructions", file=sys.stderr)
    return networks


def compare(a: dict, b: dict) -> int:
    """Print the differences; 0 when every function of every network is the same."""
    differ = 0
    for net in sorted(set(a) ^ set(b)):
        print(f"{net}: in one of the dumps only")
    for net in sorted(set(a) & set(b)):
        fa, fb = a[net], b[net]
        changed = sorted(k for k in set(fa) & set(fb) if fa[k] != fb[k])
        missing = sorted(set(fa) ^ set(fb))
        differ += len(changed) + len(missing)
        print(f"{net}: {len(set(fa) & set(fb)) - len(changed)} functions the same, {len(changed)} differ"
              + (f", only on one side: {', '.join(missing)}" if missing else ""))
        for k in changed:
            print(f"  {k}: {len(fa[k])} -> {len(fb[k])} instructions")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write each function's instructions")
    d.add_argument("out")
    d.add_argument("files", nargs="*", default=sorted(str(p) for p in (REPO / "examples").glob("*.cnn")))
    c = sub.add_parser("compare", help="name the functions whose instructions differ")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "dump":
        Path(args.out).write_text(json.dumps(dump(args.files)))
        return 0
    return compare(json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text()))


if __name__ == "__main__":
    sys.exit(main())
