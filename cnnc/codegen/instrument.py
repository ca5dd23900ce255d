"""The profiling build: a timestamp at every layer boundary of the entry points, summed per region.

``cnnc profile`` compiles the network once more with a ``Stopwatch``; the
normal build never creates one, so its code, manifest and cache keys are
untouched. Each entry point reads the CPU's cycle counter
(``llvm.readcyclecounter``: ``rdtsc`` on x86-64) when it starts and again at
the end of each region (a layer's forward or backward, the loss, the output
copy), and adds the difference to that region's counter
with an atomic add. The counters are one global array of the entry module:
every thread adds into it, so a counter holds the region's cycles summed
over threads and calls. A phase boundary (``Entry.sync``) closes the piece of
the region before it, and the next phase reopens the same region.

Two more entry points serve the runtime (``cnnc_runtime.profiler``):
``profile_clock(out)`` writes the counter's value (to convert cycles to
seconds against the wall clock) and ``profile_take(out)`` moves the counters
into ``out`` and zeroes them. The manifest's ``profile`` lists the regions in
counter order, with the floating-point operations each does per image
(``flops``: 2 x the direct convolution's or dense product's multiply-adds for
a forward, that times the products computed for a backward: the weight
gradient and the input gradient each cost as much as the forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import llvmlite.ir as ir
import networkx as nx

from cnnc.codegen import emit
from cnnc.codegen.emit import I64

COUNTERS = "cnnc_profile_counters"
CLOCK, TAKE = "profile_clock", "profile_take"
PRODUCT_OPS = ("conv", "dense")  # ops whose backward computes products as large as their forward, per gradient
# what a region that is not a layer's pass does (the loss: its name); "wait": the threads of ``infer_split``
# meeting between layers (``cnnc.codegen.split``), or of a run of training steps between its parts;
# "prepare" and "update": a native run of training steps (``cnnc.codegen.runloop``) gathering its batches and
# running the optimizer
PHASE_OPS = {"output": "copy", "wait": "barrier", "prepare": "gather", "update": "optimizer", "reduce": "batchnorm"}


@dataclass(frozen=True)
class Region:
    """One counter: the code of `layer`'s `phase` ("forward", "backward", "loss", "output", "wait") in `entry`."""

    entry: str  # "infer", "infer_split", "step_cross_entropy", "step_mse"
    phase: str
    layer: str
    op: str  # the layer's op, with a fused activation as "conv+relu"; the loss's name, "copy", "barrier"
    flops: int  # per image


def region_flops(g: nx.DiGraph, phase: str, layer: str, step=None) -> int:
    """Floating-point operations per image of `layer`'s `phase` (see the module's docstring); 0 for layers whose
    work is not products (pooling, activations, batchnorm, views)."""
    node = g.nodes[layer] if layer in g.nodes else {}
    macs = int(node.get("macs", 0))
    if phase == "forward":
        return 2 * macs
    if phase == "backward" and node.get("op") in PRODUCT_OPS and step is not None:
        src = node["inputs"][0]
        return 2 * macs * (int(step.params) + int(src in step.inputs))
    return 0


class Stopwatch:
    """The counters of one module, and the regions they count (numbered as entries first open them)."""

    def __init__(self, module: ir.Module) -> None:
        self.module = module
        self.regions: list[Region] = []
        self._index: dict[tuple[str, str, str], int] = {}
        # the array's length is known once every entry is emitted (``finish``); code indexes it as i64s
        self.counters = ir.GlobalVariable(module, ir.ArrayType(I64, 1), COUNTERS)
        self.counters.linkage = "internal"
        self._clock = ir.Function(module, ir.FunctionType(I64, []), "llvm.readcyclecounter")

    def now(self, b: ir.IRBuilder) -> ir.Value:
        return b.call(self._clock, [])

    def region(self, entry: str, phase: str, layer: str, g: nx.DiGraph, step=None) -> int:
        key = (entry, phase, layer)
        if key not in self._index:
            node = g.nodes[layer] if layer in g.nodes else {}
            op = PHASE_OPS.get(phase) or entry.removeprefix("step_") if phase not in ("forward", "backward") \
                else node["op"] + ("+add" if node.get("residual") is not None else "") \
                + (f"+{node['act']}" if node.get("act", "none") != "none" else "")
            self._index[key] = len(self.regions)
            self.regions.append(Region(entry, phase, layer, op, region_flops(g, phase, layer, step)))
        return self._index[key]

    def add(self, b: ir.IRBuilder, index: int, since: ir.Value) -> ir.Value:
        """counters[index] += now - since (atomically: threads share the counters); returns now."""
        now = self.now(b)
        slot = b.gep(self.counters, [emit.i64(index)], source_etype=I64, inbounds=True)
        b.atomic_rmw("add", slot, b.sub(now, since), "monotonic")
        return now

    def finish(self) -> list[dict]:
        """Size the counters, emit ``profile_clock`` and ``profile_take``; the manifest's region table."""
        n = max(len(self.regions), 1)
        self.counters.value_type = ir.ArrayType(I64, n)
        self.counters.initializer = ir.Constant(self.counters.value_type, None)
        fn, b, args = emit.kernel(self.module, CLOCK, ["out"])
        b.store(self.now(b), args["out"])
        b.ret_void()
        fn, b, args = emit.kernel(self.module, TAKE, ["out"])
        for i in range(n):
            slot = b.gep(self.counters, [emit.i64(i)], source_etype=I64, inbounds=True)
            taken = b.atomic_rmw("xchg", slot, ir.Constant(I64, 0), "monotonic")
            b.store(taken, b.gep(args["out"], [emit.i64(i)], source_etype=I64, inbounds=True))
        b.ret_void()
        return [asdict(r) for r in self.regions]


class Timing:
    """What one entry point being emitted needs of the stopwatch: the open region and the last timestamp."""

    def __init__(self, stopwatch: Stopwatch, entry: str) -> None:
        self.stopwatch, self.entry = stopwatch, entry
        self.open: int | None = None
        self.since: ir.Value | None = None

    def start(self, b: ir.IRBuilder) -> None:
        """At the top of a function (an entry point or the next phase of one)."""
        self.since = self.stopwatch.now(b)

    def pause(self, b: ir.IRBuilder) -> None:
        """Before a function returns: the open region's piece so far is counted."""
        if self.open is not None:
            self.since = self.stopwatch.add(b, self.open, self.since)

    @contextmanager
    def region(self, b_of, phase: str, layer: str, g: nx.DiGraph, step=None) -> Iterator[None]:
        """The code emitted in the block is `layer`'s `phase`; `b_of()` gives the current builder (a phase
        boundary inside the block switches functions)."""
        self.open = self.stopwatch.region(self.entry, phase, layer, g, step)
        yield
        self.pause(b_of())
        self.open = None


__all__ = ["CLOCK", "COUNTERS", "TAKE", "Region", "Stopwatch", "Timing", "region_flops"]
