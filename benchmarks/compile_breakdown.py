"""Where a cold compile's time goes, by CPU time: the serial part, then LLVM's work on each module.

    python benchmarks/compile_breakdown.py [FILE] [--top N]

Run it in a fresh process with bytecode caching on (as run.py's compile rows:
no PYTHONDONTWRITEBYTECODE). Part 1 imports the compiler's libraries one by
one and runs the stages up to the LLVM modules, timing each with
``time.process_time()`` (the serial part of ``cnnc.compile``, before the
processes that share the modules fork). Part 2 compiles every module in this
process, one after the other (no fork; the small kernels four to a module, as
the compile groups them: ``cnnc.codegen.target.units``), splitting each one's CPU time into
Python building its IR, printing it, LLVM parsing and verifying it, the
optimiser and code generation: their sum is the work the processes of a
parallel compile share, so about half of it lies on a 2-core critical path.
CPU time, not wall time: comparable on a loaded machine, in alternating runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("IR built and printed (Python)", "parsed (LLVM)", "verified (a group: linked)", "optimised", "code generated")


class Clock:
    """CPU milliseconds since the last mark, by name."""

    def __init__(self) -> None:
        self.last = time.process_time()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.process_time()
        self.marks[name] = (now - self.last) * 1e3
        self.last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", default=str(REPO / "examples" / "lenet5.cnn"))
    ap.add_argument("--top", type=int, default=10, help="modules to list, costliest first")
    args = ap.parse_args()
    gc.disable()  # (as cnnc.compile does: cnnc.cache.collector_paused)
    clock = Clock()
    # the imports are timed where they happen, one library at a time
    import numpy  # noqa: F401

    clock.mark("import numpy")
    from cnnc import pipeline

    clock.mark("import the runtime (cnnc.pipeline)")
    import networkx  # noqa: F401

    clock.mark("import networkx")
    import lark  # noqa: F401

    clock.mark("import lark")
    from cnnc import compiler  # noqa: F401

    clock.mark("import the front end and passes")
    from cnnc import generate
    from cnnc.codegen.module import build_module

    clock.mark("import the code generator (llvmlite.ir)")
    from cnnc.codegen import target as tg
    from cnnc_runtime.host import llvm

    binding = llvm()
    clock.mark("load LLVM (llvmlite.binding)")
    t = tg.host_target()
    b = pipeline.Build(pipeline.read_source(args.file), args.file)
    b.checked()
    clock.mark("parse and check")
    b.optimized()
    clock.mark("optimise the graph")
    modules, facts = build_module(b.optimized(), t.vector_width)
    generate.manifest_for(b.checked(), b.optimized(), facts, t)
    clock.mark("emit the entry points, declare the kernels")
    serial = sum(clock.marks.values())
    print(f"{args.file}: {len(modules)} modules, {len(tg.units(modules))} compiled apart\n\nserial part (CPU ms)")
    for name, ms in clock.marks.items():
        print(f"  {name:45s} {ms:7.1f}")
    print(f"  {'total':45s} {serial:7.1f}")

    tm = t.machine()
    totals = dict.fromkeys(STAGES, 0.0)
    rows = []
    for source in tg.units(modules):  # (small kernels four to a module, as the compile takes them)
        ms = []
        c = time.process_time()
        members = source if isinstance(source, tg.Group) else (source,)
        texts = [str(m.build() if isinstance(m, tg.Deferred) else m) for m in members]
        text = "".join(texts)
        ms.append(time.process_time())
        refs = [binding.parse_assembly(t) for t in texts]
        ms.append(time.process_time())
        for r in refs:
            r.verify()
        ref = refs[0]
        for r in refs[1:]:
            ref.link_in(r)
        ms.append(time.process_time())
        ref.triple, ref.data_layout = t.triple, str(tm.target_data)
        short = tg.short_pipeline(text)
        tg.passes(ref, tm, tiled=short)
        ms.append(time.process_time())
        tm.emit_object(ref)
        ms.append(time.process_time())
        ms = dict(zip(STAGES, ((b - a) * 1e3 for a, b in zip([c, *ms], ms))))
        for k in STAGES:
            totals[k] += ms[k]
        if isinstance(source, tg.Group):
            name = f"{len(source)} kernels: {', '.join(m.name.split('.')[-1] for m in source)}"
        else:
            name = source.name if isinstance(source, tg.Deferred) else "(entry points)"
        rows.append((sum(ms.values()), name, short, len(text)))
    work = sum(totals.values())
    print("\nLLVM phase, all modules in this process (CPU ms)")
    for k in STAGES:
        print(f"  {k:45s} {totals[k]:7.1f}")
    print(f"  {'total (shared by the processes)':45s} {work:7.1f}")
    print("\ncostliest modules (ms, pipeline, IR characters)")
    for ms, name, short, size in sorted(rows, reverse=True)[:args.top]:
        print(f"  {ms:7.1f}  {'short' if short else 'O2   '}  {size:8d}  {name}")
    print(f"\nserial + work / 2 = {serial + work / 2:.0f} ms (the compile's critical path on 2 cores, roughly, "
          "without the load of the result)")


if __name__ == "__main__":
    sys.exit(main())
