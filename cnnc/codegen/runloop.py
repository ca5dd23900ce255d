"""``run_LOSS(ctx, thread_i64)``: a run of training steps, the whole run in one native call per thread.

Every thread of the pool calls it with the same ``ctx`` (an int64 array,
fields in ``cnnc_runtime.steploop.FIELDS`` order) and its own index. For each
step ``s`` of the run, thread ``t``:

1. for each of its shards ``[a, b)`` of the batch: zeroes the shard's gradient
   buffer, gathers images ``[a, b)`` from the stored set by the run's rows
   (``gather_u8``/``gather_f32``), crops and flips them (``augment``), jitters
   them (``jitter``), and runs ``step_LOSS`` on them, each with step ``s``'s seeds;
2. at a barrier, then over its slice of the parameters: adds the other
   shards' gradients into the first one's in shard order; in a rank of a
   data-parallel job (ctx's ``reduce``: a function ``int64 reduce(int64 s)``),
   each thread notes whether its shards' losses are all finite in ``bad[t]``,
   and after a barrier thread 0 calls ``reduce(s)``, which sums the whole
   gradient across the ranks and returns non-zero when any rank's losses were
   not finite (or the sum failed), into ``bad[threads]``; then, after a
   barrier, each thread adds the L2 decay's gradient ``(w * mask) * 2 lam``
   (its penalty summed in float64 into ``penalty[s, t]``), and checks the
   slice's gradient and weights, and its shards' losses, for NaN and infinity;
   these run over the thread's slice of ``thread_update`` (its slice of the
   parameters, or of the rank's part of them in a sharded update, below);
3. at a barrier: if any thread (or the reduction) found one, every thread returns (thread 0 writes
   ``s`` into ``failed``); else it copies its slice of the weights into ``good``
   and runs ``update_KIND`` on it with step ``s``'s constants, and a barrier
   ends the step.

A sharded update (ctx's ``meet``: a function ``int64 meet(int64 code)``, called by
thread 0 between barriers) has each rank of a data-parallel job update only its part
of weights the ranks share: ``reduce`` sums only that part, and thread 0 calls
``meet(2 s)`` after the checks, which returns non-zero when any rank's checks failed
(into ``bad[threads]``), and ``meet(2 s + 1)`` after the update, so that no rank's
next step reads weights a peer is still writing.

The same kernels as the per-step path, and the reduction and the decay in
numpy's elementwise float32 order (nothing contracted into an FMA), so the
weights are the same bits. Each value in a slice is written by one thread
only, and the barriers order every read of another thread's writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import llvmlite.ir as ir
import networkx as nx

from cnnc.codegen import emit
from cnnc.codegen.emit import F32, I32, I64, PTR, for_range, i64
from cnnc.codegen.gemm import vector_loop
from cnnc.codegen.instrument import Stopwatch, Timing
from cnnc.codegen.split import wait_at_barrier
from cnnc_runtime.losses import LOSSES
from cnnc_runtime.steploop import FIELD, HYPER_FLOATS, SEEDS

F64 = ir.DoubleType()
I8 = ir.IntType(8)


class CtxFields:
    """Reads of ``ctx``'s fields (at their index in `fields`: a run's by default), each loaded once, where first
    read: read every field once in the entry block when later reads may be in blocks it does not dominate."""

    def __init__(self, b: ir.IRBuilder, ctx: ir.Value, fields: dict[str, int] = FIELD) -> None:
        self.b, self.ctx, self.fields = b, ctx, fields
        self._cache: dict[str, ir.Value] = {}

    def int(self, name: str) -> ir.Value:
        if name not in self._cache:
            at = self.b.gep(self.ctx, [i64(self.fields[name])], source_etype=I64, inbounds=True)
            self._cache[name] = self.b.load(at, typ=I64, name=name)
        return self._cache[name]

    def ptr(self, name: str) -> ir.Value:
        return self.b.inttoptr(self.int(name), PTR, name=f"{name}.p")

    def float(self, name: str) -> ir.Value:
        return self.b.bitcast(self.b.trunc(self.int(name), I32), F32, name=f"{name}.f")


def i64_at(b: ir.IRBuilder, base: ir.Value, index: ir.Value | int) -> ir.Value:
    """The int64 at `index` of `base`."""
    index = i64(index) if isinstance(index, int) else index
    return b.load(b.gep(base, [index], source_etype=I64, inbounds=True), typ=I64)


def _store_i64(b: ir.IRBuilder, value: ir.Value, base: ir.Value, index: ir.Value) -> None:
    b.store(value, b.gep(base, [index], source_etype=I64, inbounds=True))


def _bytes_at(b: ir.IRBuilder, base: ir.Value, offset: ir.Value) -> ir.Value:
    return b.gep(base, [offset], source_etype=I8, inbounds=True)



def _dispatch(b: ir.IRBuilder, selector: ir.Value, functions: list[ir.Function], call_args: list[ir.Value],
              label: str) -> None:
    """Call ``functions[selector]`` with `call_args` (none when `selector` is out of range)."""
    after = b.append_basic_block(f"{label}.done")
    switch = b.switch(selector, after)
    for index, fn in enumerate(functions):
        case = b.append_basic_block(f"{label}.{fn.name}")
        switch.add_case(i64(index), case)
        b.position_at_end(case)
        b.call(fn, call_args)
        b.branch(after)
    b.position_at_end(after)

def _not_finite_sum(b: ir.IRBuilder, values: list[ir.Value]) -> ir.Value:
    """0 for finite values, NaN for an infinity or a NaN among them: the sum of each (v - v)."""
    total = None
    for v in values:
        d = b.fsub(v, v)
        total = d if total is None else b.fadd(total, d)
    return total


def emit_runs(module: ir.Module, kinds: list[str], vw: int, graph: nx.DiGraph,
              stopwatch: Stopwatch | None = None) -> None:
    """``run_LOSS`` in `module` for every loss of the table (see `emit_run`).

    The loops differ only in the step they call, so the loop is emitted once,
    as ``run_steps(ctx, thread_i64, loss_i64)`` calling the step of the loss
    with that index in ``LOSSES``, and each ``run_LOSS`` calls it: a third
    less LLVM work on LeNet-5's entry points. The profiling build keeps a
    loop per loss: its regions are counted per step entry point.
    """
    if stopwatch is not None:
        for loss in LOSSES:
            emit_run(module, loss, kinds, vw, graph, stopwatch)
        return
    shared = emit_run(module, None, kinds, vw, graph)
    shared.attributes.add("noinline")  # (one copy of the loop: the point)
    for index, loss in enumerate(LOSSES):
        _, b, args = emit.kernel(module, f"run_{loss}", ["ctx", "thread_i64"])
        b.call(shared, [args["ctx"], args["thread_i64"], i64(index)])
        b.ret_void()


def emit_run(module: ir.Module, loss: str | None, kinds: list[str], vw: int, graph: nx.DiGraph,
             stopwatch: Stopwatch | None = None) -> ir.Function:
    """``run_LOSS`` in `module`, calling its entry points (``step_LOSS``, the gathers, ``augment``, ``jitter`` and
    the ``update_KIND`` of `kinds`, chosen by ctx's ``update``: an index into `kinds`, sorted); for no `loss`,
    ``run_steps``, whose third argument picks the step: an index into ``LOSSES``.

    In the profiling build (a `stopwatch`) its own work counts as three regions of ``step_LOSS`` (whose layers
    the step counts): the data's preparation, the optimizer (the sum, the decay, the checks, the update) and
    the waits at barriers.
    """
    fn, b, args = emit.kernel(module, f"run_{loss}" if loss else "run_steps",
                              ["ctx", "thread_i64"] + ([] if loss else ["loss_i64"]))
    timing = Timing(stopwatch, f"step_{loss}") if stopwatch else None

    @contextmanager
    def timed(phase: str, layer: str) -> Iterator[None]:
        if timing is None:
            yield
            return
        timing.start(b)  # (from here: the time since the last region, in the step, is not this region's)
        with timing.region(lambda: b, phase, layer, graph):
            yield

    def barrier() -> None:
        with timed("wait", "barriers"):
            wait_at_barrier(b, bar, threads)
    f = CtxFields(b, args["ctx"])
    t = args["thread_i64"]
    steps = [loss] if loss else list(LOSSES)
    entry = {name: module.get_global(name) for name in
             (*(f"step_{k}" for k in steps), "gather_u8", "gather_f32", "augment", "jitter",
              *(f"update_{k}" for k in kinds))}
    memset = module.declare_intrinsic("llvm.memset", [PTR, I64])
    threads, m = f.int("threads"), f.int("batch")
    shard_lo, shard_hi = i64_at(b, f.ptr("thread_shards"), b.mul(t, i64(2))), \
        i64_at(b, f.ptr("thread_shards"), b.add(b.mul(t, i64(2)), i64(1)))
    p_lo = i64_at(b, f.ptr("thread_params"), b.mul(t, i64(2)))
    p_hi = i64_at(b, f.ptr("thread_params"), b.add(b.mul(t, i64(2)), i64(1)))
    ws = b.inttoptr(i64_at(b, f.ptr("ws"), t), PTR, name="ws")
    params, x, arena, grads = f.ptr("params"), f.ptr("x"), f.ptr("arena"), f.ptr("grads")
    g0 = b.inttoptr(i64_at(b, grads, 0), PTR, name="g0")
    bar, bad = f.ptr("barrier"), f.ptr("bad")
    null = ir.Constant(PTR, None)
    image0 = f.int("image0")
    flags = {k: b.icmp_signed("!=", f.int(k), i64(0)) for k in ("byte", "jitter", "decay", "reduce", "meet")}
    reduce = b.inttoptr(f.int("reduce"), ir.FunctionType(I64, [I64]).as_pointer(), name="reduce.fn")
    meet = b.inttoptr(f.int("meet"), ir.FunctionType(I64, [I64]).as_pointer(), name="meet.fn")
    u_lo = i64_at(b, f.ptr("thread_update"), b.mul(t, i64(2)))
    u_hi = i64_at(b, f.ptr("thread_update"), b.add(b.mul(t, i64(2)), i64(1)))
    augmenting = b.or_(b.icmp_signed("!=", f.int("pad"), i64(0)), b.icmp_signed("!=", f.int("flip"), i64(0)))
    # (in the entry block, where LLVM turns them into registers)
    loss_check, check, any_bad = b.alloca(F32, name="loss_check"), b.alloca(F32, name="check"), \
        b.alloca(I64, name="any_bad")
    penalty = b.alloca(F64, name="penalty")

    pre = b.block
    head, body, fail, done = (b.append_basic_block(n) for n in ("s.head", "s.body", "s.fail", "s.done"))
    b.branch(head)
    b.position_at_end(head)
    s = b.phi(I64, name="s")
    s.add_incoming(i64(0), pre)
    b.cbranch(b.icmp_signed("<", s, f.int("steps")), body, done)
    b.position_at_end(body)

    first = b.mul(s, m, name="first")  # the step's first image in the run's rows, targets, outputs, losses
    rows = b.gep(f.ptr("rows"), [first], source_etype=I64, inbounds=True)
    target = _bytes_at(b, f.ptr("targets"), b.mul(first, f.int("target_bytes")))
    out = emit.gep(b, f.ptr("out"), b.mul(first, f.int("outputs")))
    losses = emit.gep(b, f.ptr("losses"), first)
    seed = {k: i64_at(b, f.ptr("seeds"), b.add(b.mul(s, i64(len(SEEDS))), i64(i))) for i, k in enumerate(SEEDS)}
    b.store(emit.f32(0.0), loss_check)

    # 1. this thread's shards: gather, augment, jitter, the step
    with for_range(b, shard_lo, shard_hi, name="shard") as i:
        a0 = i64_at(b, f.ptr("shard_ranges"), b.mul(i, i64(2)))
        b0 = i64_at(b, f.ptr("shard_ranges"), b.add(b.mul(i, i64(2)), i64(1)))
        g = b.inttoptr(i64_at(b, grads, i), PTR, name="g")
        b.call(memset, [g, ir.Constant(I8, 0), f.int("grad_bytes"), ir.Constant(ir.IntType(1), 0)])
        source = [f.ptr("src"), rows, x, f.ptr("geometry"), f.ptr("norm"), a0, b0]
        with timed("prepare", "data"):
            with b.if_else(flags["byte"]) as (u8, f32):
                with u8:
                    b.call(entry["gather_u8"], source)
                with f32:
                    b.call(entry["gather_f32"], source)
            with b.if_then(augmenting):
                b.call(entry["augment"], [x, seed["shift"], image0, f.int("pad"), f.int("flip"), f.ptr("fill"), ws,
                                          a0, b0])
            with b.if_then(flags["jitter"]):
                b.call(entry["jitter"], [x, seed["noise"], image0, f.float("sigma"), ws, a0, b0])
        step_args = [params, g, arena, x, out, target, losses, ws, null, null, seed["dropout"], image0,
                     f.float("scale"), f.float("smooth"), a0, b0]
        if loss:
            b.call(entry[f"step_{loss}"], step_args)
        else:
            _dispatch(b, args["loss_i64"], [entry[f"step_{k}"] for k in steps], step_args, "step")
        with for_range(b, a0, b0, name="l") as n:
            b.store(b.fadd(b.load(loss_check, typ=F32), _not_finite_sum(b, [emit.load(b, losses, n)])), loss_check)
    barrier()

    # 2. this thread's slice of the parameters: the shards' sum, the decay, the check
    if timing:
        timing.start(b)
        timing.open = stopwatch.region(timing.entry, "update", "optimizer", graph)
    with for_range(b, 1, f.int("shards"), name="other") as i:
        gi = b.inttoptr(i64_at(b, grads, i), PTR, name="gi")

        def add(b: ir.IRBuilder, j: ir.Value, w: int, gi=gi) -> None:
            emit.store(b, b.fadd(emit.load(b, g0, j, w), emit.load(b, gi, j, w)), g0, j)

        vector_loop(b, p_lo, p_hi, vw, add, name="sum")
    b.store(b.load(loss_check, typ=F32), check)
    if timing:
        timing.pause(b)
        optimizer = timing.open
    with b.if_then(flags["reduce"]):  # the ranks' sum: thread 0 calls ``reduce(s)`` (see below)
        c = b.load(check, typ=F32)
        _store_i64(b, b.zext(b.fcmp_unordered("uno", c, c), I64), bad, t)
        barrier()
        with b.if_then(b.icmp_signed("==", t, i64(0))):
            with timed("wait", "all-reduce"):
                _store_i64(b, b.call(reduce, [s]), bad, threads)
        barrier()
        b.store(emit.f32(0.0), check)  # (the losses' check went into the reduction)
    if timing:
        timing.open = optimizer
        timing.start(b)
    b.store(ir.Constant(F64, 0.0), penalty)
    decay2, mask = f.float("decay2"), f.ptr("decay_mask")

    def decay_and_check(b: ir.IRBuilder, j: ir.Value, w: int, decaying: bool) -> None:
        p, g = emit.load(b, params, j, w), emit.load(b, g0, j, w)
        if decaying:
            tmp = b.fmul(p, emit.load(b, mask, j, w))
            wide = b.fpext(tmp, F64 if w == 1 else ir.VectorType(F64, w))
            b.store(b.fadd(b.load(penalty, typ=F64), emit.hsum(b, b.fmul(wide, wide))), penalty)
            g = b.fadd(g, b.fmul(tmp, emit.splat(b, decay2, w)))
            emit.store(b, g, g0, j)
        b.store(b.fadd(b.load(check, typ=F32), emit.hsum(b, _not_finite_sum(b, [g, p]))), check)

    with b.if_else(flags["decay"]) as (decaying, plain):
        with decaying:
            vector_loop(b, u_lo, u_hi, vw, lambda b, j, w: decay_and_check(b, j, w, True), name="decay")
        with plain:
            vector_loop(b, u_lo, u_hi, vw, lambda b, j, w: decay_and_check(b, j, w, False), name="check")
    slot = b.add(b.mul(s, threads), t)
    b.store(b.load(penalty, typ=F64), b.gep(f.ptr("penalty"), [slot], source_etype=F64, inbounds=True))
    c = b.load(check, typ=F32)
    _store_i64(b, b.zext(b.fcmp_unordered("uno", c, c), I64), bad, t)
    if timing:
        timing.pause(b)
    barrier()
    with b.if_then(flags["meet"]):  # (a sharded update: every rank's verdict, from thread 0)
        with b.if_then(b.icmp_signed("==", t, i64(0))):
            with timed("wait", "all-reduce"):
                _store_i64(b, b.call(meet, [b.mul(s, i64(2))]), bad, threads)
        barrier()

    # 3. any thread's check failed: stop before the update; else keep the weights and update the slice
    b.store(i64(0), any_bad)
    with for_range(b, 0, b.add(threads, i64(1)), name="peer") as k:  # (and the reduction's verdict)
        b.store(b.or_(b.load(any_bad, typ=I64), i64_at(b, bad, k)), any_bad)
    go = b.append_basic_block("s.update")
    b.cbranch(b.icmp_signed("!=", b.load(any_bad, typ=I64), i64(0)), fail, go)
    b.position_at_end(go)
    if timing:
        timing.start(b)
    good = f.ptr("good")
    vector_loop(b, u_lo, u_hi, vw, lambda b, j, w: emit.store(b, emit.load(b, params, j, w), good, j), name="keep")
    hyper = emit.gep(b, f.ptr("hyper"), b.mul(s, i64(HYPER_FLOATS)))
    update_args = [params, g0, f.ptr("opt_mask"), f.ptr("s1"), f.ptr("s2"), hyper, u_lo, u_hi]
    _dispatch(b, f.int("update"), [entry[f"update_{kind}"] for kind in kinds], update_args, "update")
    if timing:
        timing.pause(b)
        timing.open = None
    barrier()
    with b.if_then(flags["meet"]):  # (a sharded update: every rank's part is written before any reads it)
        with b.if_then(b.icmp_signed("==", t, i64(0))):
            with timed("wait", "all-reduce"):
                b.call(meet, [b.add(b.mul(s, i64(2)), i64(1))])
        barrier()
    s.add_incoming(b.add(s, i64(1)), b.block)
    b.branch(head)

    b.position_at_end(fail)
    with b.if_then(b.icmp_signed("==", t, i64(0))):
        b.store(s, b.gep(args["ctx"], [i64(FIELD["failed"])], source_etype=I64, inbounds=True))
    b.ret_void()
    b.position_at_end(done)
    b.ret_void()
    return fn


__all__ = ["emit_run", "emit_runs"]
