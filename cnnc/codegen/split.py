"""One image on several threads: the ``infer_split`` entry point, each layer's work cut into per-thread shares.

``infer(..., n0, n1)`` splits a batch by images, so a batch of one runs on one
core. ``infer_split(params, folded, arena, x, y, ws, bar, part_i64, n0, n1)`` is run by
``PARTS`` threads at once on the same images (the same arena), thread ``part``
doing its share of every layer: a conv, dense or pooling layer its share of the
output channels (reading the whole input; a tiny one, ``WHOLE_WORK``, whole on
part 0), an elementwise op (activation, add) its share of the floats (an add of
two inputs: the floats its thread wrote of the input written last, such as a
Winograd conv's rows of every channel), a batchnorm its share of the channels.
An op without a rule here (softmax, concat) runs whole on part 0. Every share is a call to the
ordinary kernels with a smaller spec and offset pointers: no kernel knows it is
shared.

Between layers the threads meet at a barrier (``emit_barrier``: a counter and a
generation number, spun on, yielding the core after a while), but only where
needed: the entry knows every span of the arena each share reads and writes
(the memory plan's offsets are constants), and a barrier goes in front of a
layer exactly when one of its shares reads or writes what another thread's
share wrote, or writes what another thread read, since the last barrier. A
conv reads all channels its predecessor wrote, so it waits; an activation after
an add on the same floats does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.batchnorm import emit_bn_apply
from cnnc.codegen.conv import emit_conv_forward, row_tile
from cnnc.codegen.dense import emit_dense_forward
from cnnc.codegen.elementwise import emit_activation_forward, emit_copy, emit_sum
from cnnc.codegen.emit import I64, i64
from cnnc.codegen.lowering import (
    FORWARD,
    batchnorm_spec,
    cached,
    conv_spec,
    covers_input,
    dense_spec,
    pool_spec,
    sum_spec,
)
from cnnc.codegen.plan import ALIGN, Tensor
from cnnc.codegen.pool import emit_pool_forward
from cnnc.codegen.specs import CopySpec, ElementwiseSpec
from cnnc.ops import OPS
from cnnc.ops.activations import act_args

PARTS = 2  # threads sharing one image (the entry point is compiled for this count)
MIN_MACS = 4_000_000  # multiply-adds per image below which one image is too little work to share (LeNet-5: 0.4M)
SPIN = 4000  # barrier polls before the waiting thread starts yielding its core (a busy machine)
# multiply-adds (dense) or floats read (pool) below which a layer runs whole on part 0: halving a microsecond
# saves less than the barrier costs that a split puts in front of the next layer (ResNet-20's global pool and
# dense: one barrier, in front of the pool, instead of two)
WHOLE_WORK = 16_384
BAR_BYTES = 128  # the barrier's memory: the counter and the generation, a cache line each

Span = tuple[str, int, int]  # (buffer, first float, end) within one image's part of that buffer
Emit = Callable[[object], None]  # emits one kernel call on an Entry


@dataclass
class Share:
    """One thread's part of a node: its kernel calls and the spans of activations they read and write."""

    calls: list[Emit] = field(default_factory=list)
    reads: list[Span] = field(default_factory=list)
    writes: list[Span] = field(default_factory=list)


def span(t: Tensor, lo: int = 0, hi: int | None = None) -> Span:
    return (t.base, t.offset + lo, t.offset + (t.size if hi is None else hi))


def part(t: Tensor, lo: int, hi: int) -> Tensor:
    """Floats [lo, hi) of tensor `t` of each image, as a tensor of its own."""
    return Tensor(t.base, t.offset + lo, t.stride, hi - lo)


def cuts(n: int, grain: int = 1) -> list[tuple[int, int]]:
    """[0, n) in PARTS ranges of whole `grain`s, as even as possible (some may be empty)."""
    units = -(-n // grain)
    bounds = [min(n, (units * p // PARTS) * grain) for p in range(PARTS)] + [n]
    return [(bounds[p], bounds[p + 1]) for p in range(PARTS)]


def _param(ctx, layer: str, kind: str, delta: int) -> ir.Value:
    """Parameter `kind` of `layer` from float `delta` on (a null pointer if the layer has none)."""
    slot = ctx.slots.get((layer, kind))
    if slot is None:
        return ir.Constant(emit.PTR, None)
    return emit.gep(ctx.b, ctx.args[slot.buffer], slot.offset + delta)


# ---- shares of each kernel family ------------------------------------------------------------------


def _by_outputs(ctx, name: str, x: Tensor, y: Tensor, o: int, per_out: int, per_w: int, kernel,
                workspace: bool, residual: Tensor | None = None) -> list[Share]:
    """A layer cut by output channels: each share reads all of `x`, writes its channels of `y`
    (``per_out`` floats each), reads the same channels of `residual` (a conv's, added to its outputs) and its
    rows of the weight (``per_w`` floats each); ``kernel(o, lo)``: the kernel of the `o` channels from `lo` and
    its arguments after the output (and ``ws``, `workspace`: the kernel takes the thread's)."""
    shares = []
    for lo, hi in cuts(o):
        if lo == hi:
            shares.append(Share())
            continue
        out = part(y, lo * per_out, hi * per_out)
        res = [part(residual, lo * per_out, hi * per_out)] if residual is not None else []

        def call(ctx, lo=lo, hi=hi, out=out, res=res) -> None:
            fn, extra = kernel(hi - lo, lo)
            args = [x, _param(ctx, name, "weight", lo * per_w), _param(ctx, name, "bias", lo), out, *res]
            ctx.call(fn, *args, *([ctx.ws] if workspace else []), *extra)

        shares.append(Share([call], [span(x), *map(span, res)], [span(out)]))
    return shares


def split_conv(ctx, name: str) -> list[Share] | None:
    if covers_input(ctx, name):
        return split_dense(ctx, name)
    node = ctx.node(name)
    spec = conv_spec(ctx, name)
    if spec.groups != 1 or spec.connect is not None:
        return None
    x, y = ctx.value(node["inputs"][0]), ctx.value(name)
    residual = ctx.value(node["residual"]) if spec.residual else None
    tile = row_tile(spec, ctx.builder.vw)
    # By tile rows where the image has more tiles than output channels: a cut by channels transforms the input
    # (c x tiles) on both threads, a cut by rows reads the Winograd weights (o x c) and checks them on both.
    # (ResNet-20, one share's CPU: 32->32 on 16x16 by F(4x4), 16 tiles: 15.3 us by channels, 18.7 by rows, whose
    # 2 tile rows fill half a vector; 64->64 on 8x8, 16 tiles: 14.4 and 16.6; 16->16 on 32x32: 15.9 and 13.4.)
    if tile and spec.oh // tile >= PARTS and (spec.oh // tile) * (spec.ow // tile) > spec.o:
        return _by_rows(ctx, name, spec, x, y, tile, residual)

    def kernel(o: int, lo: int) -> tuple[ir.Function, list[ir.Value]]:
        share = cached(ctx, dataclasses.replace(spec, o=o))
        return ctx.kernel(emit_conv_forward, share), ctx.weight_cache(share, (name, lo, lo + o))

    return _by_outputs(ctx, name, x, y, spec.o, spec.oh * spec.ow, spec.c * spec.kh * spec.kw, kernel, True,
                       residual)


def _by_rows(ctx, name: str, spec, x: Tensor, y: Tensor, tile: int, residual: Tensor | None) -> list[Share]:
    """A Winograd conv cut by whole tile rows: each share computes every output channel's rows [r0, r1) (the input
    transform is not done twice, as a cut by channels does; the shares keep the same Winograd weights as the
    whole layer, ``Entry.weight_cache``)."""
    shares = []
    plane = spec.oh * spec.ow
    for lo, hi in cuts(spec.oh // tile):
        if lo == hi:
            shares.append(Share())
            continue
        share = dataclasses.replace(spec, rows=(lo * tile, hi * tile))

        def call(ctx, share=share) -> None:
            fn = ctx.kernel(emit_conv_forward, share)
            ctx.call(fn, x, _param(ctx, name, "weight", 0), _param(ctx, name, "bias", 0), y,
                     *([residual] if residual is not None else []), ctx.ws, *ctx.weight_cache(share, (name, 0, spec.o)))

        rows = [(r * plane + lo * tile * spec.ow, r * plane + hi * tile * spec.ow) for r in range(spec.o)]
        reads = [span(residual, a, z) for a, z in rows] if residual is not None else []
        shares.append(Share([call], [span(x), *reads], [span(y, a, z) for a, z in rows]))
    return shares


def split_dense(ctx, name: str) -> list[Share] | None:
    spec = dense_spec(ctx, name)
    if spec.o * spec.f < WHOLE_WORK:
        return None
    x, y = ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name)
    return _by_outputs(ctx, name, x, y, spec.o, 1, spec.f,
                       lambda o, lo: (ctx.kernel(emit_dense_forward, dataclasses.replace(spec, o=o)), []), False)


def split_pool(ctx, name: str) -> list[Share] | None:
    spec = pool_spec(ctx, name)
    if spec.c * spec.h * spec.w < WHOLE_WORK:
        return None
    x, y = ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name)
    shares = []
    for lo, hi in cuts(spec.c):
        src = part(x, lo * spec.h * spec.w, hi * spec.h * spec.w)
        dst = part(y, lo * spec.oh * spec.ow, hi * spec.oh * spec.ow)
        fn = ctx.kernel(emit_pool_forward, dataclasses.replace(spec, c=hi - lo)) if hi > lo else None
        shares.append(_one_call(fn, [src, dst], [src], [dst]))
    return shares


def split_activation(ctx, name: str) -> list[Share]:
    node = ctx.node(name)
    x, y = ctx.value(node["inputs"][0]), ctx.value(name)
    shares = []
    for lo, hi in cuts(y.size, ALIGN):
        spec = ElementwiseSpec(size=hi - lo, act=node["op"], act_args=act_args(node["args"]), x_stride=x.stride,
                               y_stride=y.stride)
        fn = ctx.kernel(emit_activation_forward, spec) if hi > lo else None
        shares.append(_one_call(fn, [part(x, lo, hi), part(y, lo, hi)], [part(x, lo, hi)], [part(y, lo, hi)]))
    return shares


def split_add(ctx, name: str) -> list[Share]:
    y = ctx.value(name)
    inputs = ctx.node(name)["inputs"]
    if len(inputs) == 2:  # in one pass (with a fused activation)
        a, b = (ctx.value(src) for src in inputs)
        ranges = _cut_like_input(ctx, name) or [[(lo, hi)] for lo, hi in cuts(y.size, ALIGN)]
        shares = []
        for spans in ranges:
            share = Share()
            for lo, hi in spans:
                args = [part(a, lo, hi), part(b, lo, hi), part(y, lo, hi)]
                share.calls.append(_call(ctx.kernel(emit_sum, sum_spec(ctx, name, hi - lo)), *args))
                share.reads += [span(t) for t in args[:2]]
                share.writes.append(span(args[2]))
            shares.append(share)
        return shares
    shares = []
    for lo, hi in cuts(y.size, ALIGN):
        share = Share()
        for port, src in enumerate(ctx.node(name)["inputs"]):
            if hi == lo:
                continue
            x = ctx.value(src)
            spec = CopySpec(count=hi - lo, src_stride=x.stride, dst_stride=y.stride, accumulate=port > 0)
            fn = ctx.kernel(emit_copy, spec)
            share.calls.append(_call(fn, part(x, lo, hi), part(y, lo, hi)))
            share.reads.append(span(x, lo, hi))
        share.writes.append(span(y, lo, hi))
        shares.append(share)
    return shares


def _cut_like_input(ctx, name: str) -> list[list[tuple[int, int]]] | None:
    """Each part's float ranges of `name`'s input written last (per image, from the tensor's start) where every
    input has the output's size and those ranges cover it exactly: an elementwise op cut as its input was written
    reads only what its own thread wrote (a Winograd conv's rows of every channel), so it needs no barrier after
    that layer. None: an input not written by this entry's shares (``emit_split_entry`` records them), or
    another size."""
    inputs, size = ctx.node(name)["inputs"], ctx.value(name).size
    if any(src not in ctx.written or ctx.value(src).size != size for src in inputs):
        return None
    src = max(inputs, key=lambda s: ctx.written[s][0])
    t = ctx.value(src)
    ranges = [[(lo - t.offset, hi - t.offset) for base, lo, hi in spans if base == t.base]
              for spans in ctx.written[src][1]]
    return ranges if _tile(sorted(r for spans in ranges for r in spans), size) else None


def _tile(ranges: list[tuple[int, int]], size: int) -> bool:
    """Whether the sorted `ranges` cover [0, size) without a gap or an overlap."""
    at = 0
    for lo, hi in ranges:
        if lo != at or hi <= lo:
            return False
        at = hi
    return at == size


def split_batchnorm(ctx, name: str) -> list[Share]:
    """An unfolded batchnorm (inference: the scale and shift ``fold`` wrote), by channels."""
    x, y = ctx.value(ctx.node(name)["inputs"][0]), ctx.value(name)
    spec = batchnorm_spec(ctx, name, y)
    shares = []
    for lo, hi in cuts(spec.c):
        src, dst = part(x, lo * spec.hw, hi * spec.hw), part(y, lo * spec.hw, hi * spec.hw)
        if hi == lo:
            shares.append(Share())
            continue
        fn = ctx.kernel(emit_bn_apply, dataclasses.replace(spec, c=hi - lo))

        def call(ctx, fn=fn, src=src, dst=dst, lo=lo) -> None:
            ctx.call(fn, src, _param(ctx, name, "weight", lo), _param(ctx, name, "bias", lo), dst)

        shares.append(Share([call], [span(src)], [span(dst)]))
    return shares


def _call(fn: ir.Function, *args: Tensor) -> Emit:
    """A call of kernel `fn` on `args` (then the entry's image range)."""
    return lambda ctx: ctx.call(fn, *args)


def _one_call(fn: ir.Function | None, args: list[Tensor], reads: list[Tensor], writes: list[Tensor]) -> Share:
    if fn is None:
        return Share()
    return Share([_call(fn, *args)], [span(t) for t in reads], [span(t) for t in writes])


def split_nothing(ctx, name: str) -> list[Share]:
    """Views and the input: no code."""
    return [Share() for _ in range(PARTS)]


# kernel family (``OpDef.lowering``) -> its shares; None: the whole op on part 0
SPLITS: dict[str, Callable[[object, str], list[Share] | None]] = {
    "input": split_nothing,
    "view": split_nothing,
    "dropout": split_nothing,  # inference: a view
    "conv": split_conv,
    "dense": split_dense,
    "pool": split_pool,
    "activation": split_activation,
    "add": split_add,
    "batchnorm": split_batchnorm,
}


def _whole(ctx, name: str) -> list[Share]:
    """The op run whole by part 0 with its ordinary rule (it reads all its inputs, writes all its output)."""
    reads = [span(ctx.value(src)) for src in ctx.node(name)["inputs"]]
    whole = Share([lambda ctx: FORWARD[ctx.node(name)["op"]](ctx, name)], reads, [span(ctx.value(name))])
    return [whole] + [Share() for _ in range(PARTS - 1)]


# ---- the entry point -------------------------------------------------------------------------------


def _overlap(a: Span, b: Span) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


class Barriers:
    """What each part read and wrote since the last barrier: decides where the next one must go."""

    def __init__(self) -> None:
        self.reads: list[list[Span]] = [[] for _ in range(PARTS)]
        self.writes: list[list[Span]] = [[] for _ in range(PARTS)]

    def needed(self, shares: list[Share]) -> bool:
        for p, share in enumerate(shares):
            for q in range(PARTS):
                if q == p:
                    continue
                theirs = self.reads[q] + self.writes[q]
                if any(_overlap(w, t) for w in share.writes for t in theirs):
                    return True
                if any(_overlap(r, t) for r in share.reads for t in self.writes[q]):
                    return True
        return False

    def clear(self) -> None:
        for lists in (self.reads, self.writes):
            for spans in lists:
                spans.clear()

    def add(self, shares: list[Share]) -> None:
        for p, share in enumerate(shares):
            self.reads[p] += share.reads
            self.writes[p] += share.writes


def emit_split_entry(entry, order: list[str], output_copy: Callable[[object], None] | None,
                     output_span: tuple[Span, Span] | None) -> int:
    """Emit the body of ``infer_split`` on `entry` (an ``Entry`` with ``bar`` and ``part_i64``); the barrier count."""
    b = entry.b
    barrier = entry.kernel(emit_barrier, PARTS)
    seen = Barriers()
    count = 0

    def run(shares: list[Share], phase: str, name: str) -> None:
        nonlocal count
        if seen.needed(shares):
            with entry.timed("wait", "barriers"):  # (the profiling build counts waits apart from the layers)
                b.call(barrier, [entry.args["bar"], entry.args["part_i64"]])
            seen.clear()
            count += 1
        with entry.timed(phase, name):
            for p, share in enumerate(shares):
                if not share.calls:
                    continue
                with b.if_then(b.icmp_signed("==", entry.args["part_i64"], i64(p))):
                    for call in share.calls:
                        call(entry)
        seen.add(shares)

    for i, n in enumerate(order):
        rule = SPLITS.get(OPS[entry.node(n)["op"]].lowering)
        shares = rule(entry, n) if rule is not None else None
        shares = shares if shares is not None else _whole(entry, n)
        run(shares, "forward", n)
        entry.written[n] = (i, [share.writes for share in shares])
    if output_copy is not None:
        run([Share([output_copy], [output_span[0]], [output_span[1]])] + [Share() for _ in range(PARTS - 1)],
            "output", entry.g.graph["output"])
    b.ret_void()
    return count


def emit_barrier(module: ir.Module, name: str, parts: int, vw: int) -> ir.Function:
    """``(bar, part_i64)``: wait until all `parts` threads have arrived (``wait_at_barrier``)."""
    fn = ir.Function(module, ir.FunctionType(emit.VOID, [emit.PTR, I64]), name=name)
    fn.attributes.add("nounwind")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    wait_at_barrier(b, fn.args[0], i64(parts))
    b.ret_void()
    return fn


def wait_at_barrier(b: ir.IRBuilder, bar: ir.Value, parts: ir.Value) -> None:
    """Emit: wait until `parts` threads have arrived at the barrier in ``bar``.

    ``bar`` holds two i64s a cache line apart: the number arrived, and the
    generation. The last to arrive resets the count and bumps the generation;
    the others spin on the generation (acquire), then yield the core between
    polls once they have spun ``SPIN`` times (a thread of theirs was descheduled).
    """
    module = b.module
    count = bar
    gen = b.gep(bar, [i64(8)], source_etype=I64, inbounds=True)
    now = b.load_atomic(gen, "acquire", 8, typ=I64)
    arrived = b.atomic_rmw("add", count, i64(1), "acq_rel")
    with b.if_else(b.icmp_signed("==", arrived, b.sub(parts, i64(1)))) as (last, wait):
        with last:
            # (exchanges: llvmlite's store_atomic wants typed pointers)
            b.atomic_rmw("xchg", count, i64(0), "monotonic")
            b.atomic_rmw("xchg", gen, b.add(now, i64(1)), "release")
        with wait:
            yield_fn = module.globals.get("sched_yield") or ir.Function(
                module, ir.FunctionType(ir.IntType(32), []), name="sched_yield")
            head = b.append_basic_block("spin")
            done = b.append_basic_block("arrived")
            pre = b.block
            b.branch(head)
            b.position_at_end(head)
            polls = b.phi(I64, name="polls")
            polls.add_incoming(i64(0), pre)
            moved = b.icmp_signed("!=", b.load_atomic(gen, "acquire", 8, typ=I64), now)
            more = b.append_basic_block("again")
            b.cbranch(moved, done, more)
            b.position_at_end(more)
            with b.if_then(b.icmp_signed(">", polls, i64(SPIN))):
                b.call(yield_fn, [])
            polls.add_incoming(b.add(polls, i64(1)), b.block)
            b.branch(head)
            b.position_at_end(done)
