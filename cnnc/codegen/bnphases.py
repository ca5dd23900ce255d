"""``phased_LOSS(ctx, thread_i64)``: a training step with batchnorm in one native call per thread.

A step with batchnorm is cut into phases at each batchnorm's reduction
(``step_LOSS``, ``step_LOSS_1``, ...: ``cnnc.codegen.module``). ResNet-20 has
44 of them; going back to Python between phases (waking the pool's threads,
a dozen numpy calls per reduction) cost a sixth of its step. Here every
thread of the pool calls one function, which runs each phase on its own
shards, meets the others at a barrier, and thread 0 reduces the shards'
partial sums as ``cnnc_runtime.batchnorm.Statistics`` does in Python: the same
float64 operations in the same order (Chan et al.'s pairwise combination in
shard order, nothing contracted into an FMA), so the coefficients, the
running statistics and the gradients are the same bits either way, on any
number of threads. A second barrier lets the others read them.

``ctx`` is one int64 array, fields in ``cnnc_runtime.batchnorm.PHASED_FIELDS``
order. Before its first phase each thread waits at the barrier and returns
if ``failed`` is set (a thread's batch preparation raised in Python), so no
thread is left waiting and the state is not touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir
import networkx as nx
import numpy as np

from cnnc.codegen import emit
from cnnc.codegen.emit import F32, PTR, for_range, i64
from cnnc.codegen.instrument import Stopwatch, Timing
from cnnc.codegen.runloop import CtxFields, i64_at
from cnnc.codegen.split import wait_at_barrier
from cnnc_runtime.batchnorm import PHASED_FIELD, PHASED_FIELDS

F64 = ir.DoubleType()


@dataclass(frozen=True)
class Reduction:
    """What one reduction needs of its batchnorm: sizes, where its numbers live, its constants."""

    kind: str  # "forward" or "backward"
    channels: int
    count: int  # values per channel of one image
    stats: int  # doubles into a shard's partial sums (and into ``saved``): first sums, then second sums
    coefs: dict[str, int]  # floats into ``coefs`` of each of BN_COEFS
    weight: int  # floats into params (and grads)
    bias: int
    running_mean: int  # floats into state
    running_var: int
    eps: float
    momentum: float


def _ptr_at(b: ir.IRBuilder, base: ir.Value, index: ir.Value | int) -> ir.Value:
    return b.inttoptr(i64_at(b, base, index), PTR)


def _f64_gep(b: ir.IRBuilder, base: ir.Value, offset: ir.Value) -> ir.Value:
    return b.gep(base, [offset], source_etype=F64, inbounds=True)


def _d(value: float) -> ir.Constant:
    return ir.Constant(F64, value)


def _widen(b: ir.IRBuilder, base: ir.Value, offset: ir.Value) -> ir.Value:
    return b.fpext(emit.load(b, base, offset), F64)


def _shard_count(b: ir.IRBuilder, f: CtxFields, i: ir.Value, count: int) -> ir.Value:
    """Values per channel in shard `i`: its images times `count`, as a double."""
    ranges = f.ptr("shard_ranges")
    a0, b0 = i64_at(b, ranges, b.mul(i, i64(2))), i64_at(b, ranges, b.add(b.mul(i, i64(2)), i64(1)))
    return b.sitofp(b.mul(b.sub(b0, a0), i64(count)), F64)


def _forward(b: ir.IRBuilder, f: CtxFields, r: Reduction) -> None:
    """``Statistics.forward``: the shards' moments combined in order -> scale, shift, mean; the running
    statistics moved; the mean used and 1/std kept in ``saved`` for the backward reduction."""
    params, state, coefs, saved, stats = f.ptr("params"), f.ptr("state"), f.ptr("coefs"), f.ptr("saved"), \
        f.ptr("stats")
    acc = {k: b.alloca(F64, name=k) for k in ("n", "mean", "m2")}
    with for_range(b, 0, r.channels, name="ch") as ch:
        for v in acc.values():
            b.store(_d(0.0), v)
        with for_range(b, 0, f.int("shards"), name="sh") as i:
            c = _shard_count(b, f, i, r.count)
            with b.if_then(b.fcmp_ordered("!=", c, _d(0.0))):
                part = _ptr_at(b, stats, i)
                s = b.load(_f64_gep(b, part, b.add(ch, i64(r.stats))), typ=F64)
                q = b.load(_f64_gep(b, part, b.add(ch, i64(r.stats + r.channels))), typ=F64)
                n, mean, m2 = (b.load(acc[k], typ=F64) for k in ("n", "mean", "m2"))
                mu = b.fdiv(s, c)
                total = b.fadd(n, c)
                delta = b.fsub(mu, mean)
                b.store(b.fadd(mean, b.fmul(delta, b.fdiv(c, total))), acc["mean"])
                b.store(b.fadd(b.fadd(m2, q), b.fmul(b.fmul(delta, delta), b.fdiv(b.fmul(n, c), total))),
                        acc["m2"])
                b.store(total, acc["n"])
        n, mean, m2 = (b.load(acc[k], typ=F64) for k in ("n", "mean", "m2"))
        var = b.fdiv(m2, n)
        sqrt = b.module.declare_intrinsic("llvm.sqrt", [F64])
        istd = b.fdiv(_d(1.0), b.call(sqrt, [b.fadd(var, _d(r.eps))]))
        scale = b.fmul(_widen(b, params, b.add(ch, i64(r.weight))), istd)
        mean32 = b.fptrunc(mean, F32)
        mean_used = b.fpext(mean32, F64)
        emit.store(b, b.fptrunc(scale, F32), coefs, b.add(ch, i64(r.coefs["scale"])))
        shift = b.fsub(_widen(b, params, b.add(ch, i64(r.bias))), b.fmul(mean_used, scale))
        emit.store(b, b.fptrunc(shift, F32), coefs, b.add(ch, i64(r.coefs["shift"])))
        emit.store(b, mean32, coefs, b.add(ch, i64(r.coefs["mean"])))
        b.store(mean_used, _f64_gep(b, saved, b.add(ch, i64(r.stats))))
        b.store(istd, _f64_gep(b, saved, b.add(ch, i64(r.stats + r.channels))))
        # numpy's (1 - m) * running: a float32 product (the Python float is weak), then + m * value in float64
        keep, m = emit.f32(float(np.float32(1.0 - r.momentum))), _d(r.momentum)
        unbiased = b.fdiv(m2, b.select(b.fcmp_ordered(">", b.fsub(n, _d(1.0)), _d(1.0)), b.fsub(n, _d(1.0)),
                                       _d(1.0)))
        for at, value in ((r.running_mean, mean), (r.running_var, unbiased)):
            old = emit.load(b, state, b.add(ch, i64(at)))
            new = b.fadd(b.fpext(b.fmul(keep, old), F64), b.fmul(m, value))
            emit.store(b, b.fptrunc(new, F32), state, b.add(ch, i64(at)))


def _backward(b: ir.IRBuilder, f: CtxFields, r: Reduction) -> None:
    """``Statistics.backward``: sum(dy) and sum(dy (x - mean)) over the shards in order -> the bias and weight
    gradients (added to shard 0's gradient) and the input gradient's coefficients k, cx, cc."""
    params, coefs, saved, stats = f.ptr("params"), f.ptr("coefs"), f.ptr("saved"), f.ptr("stats")
    grads = _ptr_at(b, f.ptr("grads"), 0)
    n = b.alloca(F64, name="n")
    b.store(_d(0.0), n)
    with for_range(b, 0, f.int("shards"), name="cnt") as i:  # the count, as the forward reduction summed it
        b.store(b.fadd(b.load(n, typ=F64), _shard_count(b, f, i, r.count)), n)
    total = b.load(n, typ=F64)
    acc = {k: b.alloca(F64, name=k) for k in ("sdy", "sdyx")}
    with for_range(b, 0, r.channels, name="ch") as ch:
        first = _ptr_at(b, stats, 0)
        b.store(b.load(_f64_gep(b, first, b.add(ch, i64(r.stats))), typ=F64), acc["sdy"])
        b.store(b.load(_f64_gep(b, first, b.add(ch, i64(r.stats + r.channels))), typ=F64), acc["sdyx"])
        with for_range(b, 1, f.int("shards"), name="sh") as i:
            part = _ptr_at(b, stats, i)
            for k, off in (("sdy", r.stats), ("sdyx", r.stats + r.channels)):
                b.store(b.fadd(b.load(acc[k], typ=F64), b.load(_f64_gep(b, part, b.add(ch, i64(off))), typ=F64)),
                        acc[k])
        sdy, sdyx = b.load(acc["sdy"], typ=F64), b.load(acc["sdyx"], typ=F64)
        mean = b.load(_f64_gep(b, saved, b.add(ch, i64(r.stats))), typ=F64)
        istd = b.load(_f64_gep(b, saved, b.add(ch, i64(r.stats + r.channels))), typ=F64)
        for at, value in ((r.weight, b.fmul(sdyx, istd)), (r.bias, sdy)):
            where = b.add(ch, i64(at))
            emit.store(b, b.fadd(emit.load(b, grads, where), b.fptrunc(value, F32)), grads, where)
        k = b.fmul(_widen(b, params, b.add(ch, i64(r.weight))), istd)
        neg_k = b.fneg(k)
        cx = b.fdiv(b.fmul(b.fmul(b.fmul(neg_k, istd), istd), sdyx), total)
        cc = b.fsub(b.fdiv(b.fmul(neg_k, sdy), total), b.fmul(cx, mean))
        for which, value in (("k", k), ("cx", cx), ("cc", cc)):
            emit.store(b, b.fptrunc(value, F32), coefs, b.add(ch, i64(r.coefs[which])))


def emit_phased(module: ir.Module, loss: str, phases: list[ir.Function], reductions: list[Reduction],
                graph: nx.DiGraph, stopwatch: Stopwatch | None = None) -> ir.Function:
    """``phased_LOSS(ctx, thread_i64)`` in `module`: `phases` (``step_LOSS`` and its continuations) on the
    thread's shards, the `reductions` between them (see the module doc). In the profiling build (a
    `stopwatch`) the waits and the reductions are regions of ``step_LOSS``."""
    fn, b, args = emit.kernel(module, f"phased_{loss}", ["ctx", "thread_i64"])
    timing = Timing(stopwatch, f"step_{loss}") if stopwatch else None
    f = CtxFields(b, args["ctx"], PHASED_FIELD)
    for name in PHASED_FIELDS:  # (loaded in the entry block, which dominates every use; "failed" after a barrier)
        if name != "failed":
            f.int(name)
    t = args["thread_i64"]
    threads, bar = f.int("threads"), f.ptr("barrier")

    def region(phase: str, layer: str, emit_body) -> None:
        if timing is None:
            emit_body()
            return
        timing.start(b)
        with timing.region(lambda: b, phase, layer, graph):
            emit_body()

    def barrier() -> None:
        region("wait", "barriers", lambda: wait_at_barrier(b, bar, threads))

    thread_shards = f.ptr("thread_shards")
    lo = i64_at(b, thread_shards, b.mul(t, i64(2)))
    hi = i64_at(b, thread_shards, b.add(b.mul(t, i64(2)), i64(1)))
    ranges, grads, stats, ws = f.ptr("shard_ranges"), f.ptr("grads"), f.ptr("stats"), f.ptr("ws")
    fixed = [f.ptr("params"), None, f.ptr("arena"), f.ptr("x"), f.ptr("out"), f.ptr("targets"), f.ptr("losses"),
             _ptr_at(b, ws, t), None, f.ptr("coefs"), f.int("seed"), f.int("image0"), f.float("scale"),
             f.float("smooth")]
    barrier()
    go, stop = b.append_basic_block("go"), b.append_basic_block("stop")
    b.cbranch(b.icmp_signed("!=", f.int("failed"), i64(0)), stop, go)
    b.position_at_end(stop)
    b.ret_void()
    b.position_at_end(go)
    for k, phase in enumerate(phases):
        with for_range(b, lo, hi, name=f"shard{k}") as i:
            a0 = i64_at(b, ranges, b.mul(i, i64(2)))
            b0 = i64_at(b, ranges, b.add(b.mul(i, i64(2)), i64(1)))
            call = list(fixed)
            call[1], call[8] = _ptr_at(b, grads, i), _ptr_at(b, stats, i)
            b.call(phase, [*call, a0, b0])
        if k == len(reductions):
            break
        r = reductions[k]
        barrier()
        with b.if_then(b.icmp_signed("==", t, i64(0))):
            region("reduce", "batchnorm", lambda r=r: (_forward if r.kind == "forward" else _backward)(b, f, r))
        barrier()
    b.ret_void()
    return fn


__all__ = ["Reduction", "emit_phased"]
