"""Handing one image's second share to a pool thread that waits in native code: ``split_post``, ``split_serve``,
``split_wait``.

Waking a pool thread through Python (an event, the GIL, a ctypes call) costs
tens of microseconds a call: a tenth of a ResNet-20 image. Instead the thread
runs ``split_serve(ctl)``, which spins (yielding its core after a while) on a
control block and runs each posted call of ``infer_split`` as part 1, and
returns only after ``IDLE_CYCLES`` without one (or when told to stop), so a
loop of small calls finds it waiting. The caller posts with ``split_post``,
runs part 0 itself, then ``split_wait``\\ s for part 1.

The block (int64s, each field on a cache line of its own, ``cnnc_runtime.parallel``
owns it): ``state`` (0: no server; 1: a server waits; 2: a call is posted or
being posted), ``seq`` (the number of the last call posted), ``done`` (of the
last call run), ``stop``, then the call's arguments. A server leaves only by
moving ``state`` from 1 to 0, and a caller posts to a live server only by moving
it from 1 to 2, so a call is never posted to a server on its way out: when the
caller's move fails, it starts a server itself (which finds the call posted).
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import I64, PTR, i64

STATE, SEQ, DONE, STOP, ARGS = 0, 8, 16, 24, 32  # int64 offsets in the block
ARG_NAMES = ["params", "folded", "arena", "x", "y", "ws", "bar", "n0", "n1"]  # infer_split's, but the part
INT64S = ARGS + len(ARG_NAMES)
IDLE_CYCLES = 1_000_000  # time-stamp counter ticks (~0.3 ms) without a call before a server returns
SPIN_CYCLES = 100_000  # ticks (~30 us: a loop's Python between two calls) it spins before sleeping between polls
SPIN = 4000  # polls before a waiting thread starts yielding its core
YIELDS = 200  # yields before it sleeps between polls
NAP_US = 50


def emit_handoff(module: ir.Module, infer_split: ir.Function) -> None:
    """Emit ``split_post``, ``split_serve`` and ``split_wait`` for `infer_split` into `module`."""
    _emit_post(module)
    _emit_serve(module, infer_split)
    _emit_wait(module)


def _field(b: ir.IRBuilder, ctl: ir.Value, at: int) -> ir.Value:
    return b.gep(ctl, [i64(at)], source_etype=I64, inbounds=True)


def _emit_post(module: ir.Module) -> None:
    """``split_post(ctl, seq, params, folded, arena, x, y, ws, bar, n0, n1) -> live``: post call `seq`; 1 when a
    waiting server took it, 0 when the caller must start one."""
    fn = ir.Function(module, ir.FunctionType(I64, [PTR, I64] + [PTR] * 7 + [I64, I64]), name="split_post")
    fn.attributes.add("nounwind")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    ctl, seq, args = fn.args[0], fn.args[1], fn.args[2:]
    taken = b.cmpxchg(_field(b, ctl, STATE), i64(1), i64(2), "acq_rel", "acquire")
    live = b.extract_value(taken, 1)
    with b.if_then(b.not_(live)):  # (state 0: no server; the caller starts one)
        b.atomic_rmw("xchg", _field(b, ctl, STATE), i64(2), "monotonic")
    for k, value in enumerate(args):
        b.store(b.ptrtoint(value, I64) if value.type == PTR else value, _field(b, ctl, ARGS + k))
    b.atomic_rmw("xchg", _field(b, ctl, SEQ), seq, "release")
    b.ret(b.zext(live, I64))


def _libc(module: ir.Module, name: str, args: list[ir.Type]) -> ir.Function:
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ir.IntType(32), args), name=name)


def _spin(b: ir.IRBuilder, polls: ir.Value) -> None:
    """After ``SPIN`` polls, yield the core at each poll (the other side's thread may be descheduled), and after
    ``YIELDS`` more, sleep ``NAP_US`` at each: on a machine with more threads than cores, a yield may hand the
    core straight back, and the other side waits for it."""
    with b.if_then(b.icmp_signed(">", polls, i64(SPIN))):
        with b.if_else(b.icmp_signed(">", polls, i64(SPIN + YIELDS))) as (late, soon):
            with late:
                b.call(_libc(b.module, "usleep", [ir.IntType(32)]), [ir.Constant(ir.IntType(32), NAP_US)])
            with soon:
                b.call(_libc(b.module, "sched_yield", []), [])


def _emit_serve(module: ir.Module, infer_split: ir.Function) -> None:
    """``split_serve(ctl)``: run each call posted as part 1 until ``IDLE_CYCLES`` pass without one, or ``stop``."""
    fn = ir.Function(module, ir.FunctionType(emit.VOID, [PTR]), name="split_serve")
    fn.attributes.add("nounwind")
    ctl = fn.args[0]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    clock = module.globals.get("llvm.readcyclecounter") or ir.Function(module, ir.FunctionType(I64, []),
                                                                         "llvm.readcyclecounter")
    first = b.load_atomic(_field(b, ctl, DONE), "acquire", 8, typ=I64)
    start = b.call(clock, [])
    entry = b.block
    head, run, idle, leave, again = (fn.append_basic_block(n) for n in ("head", "run", "idle", "leave", "again"))
    b.branch(head)

    b.position_at_end(head)
    last, since, polls = b.phi(I64, "last"), b.phi(I64, "since"), b.phi(I64, "polls")
    for phi, value in ((last, first), (since, start), (polls, i64(0))):
        phi.add_incoming(value, entry)
    seq = b.load_atomic(_field(b, ctl, SEQ), "acquire", 8, typ=I64)
    b.cbranch(b.icmp_signed("!=", seq, last), run, idle)

    b.position_at_end(run)
    args = [b.load(_field(b, ctl, ARGS + k), typ=I64) for k in range(len(ARG_NAMES))]
    pointers = [b.inttoptr(a, PTR) for a in args[:7]]
    b.call(infer_split, [*pointers, i64(1), args[7], args[8]])
    b.atomic_rmw("xchg", _field(b, ctl, STATE), i64(1), "release")
    b.atomic_rmw("xchg", _field(b, ctl, DONE), seq, "release")
    now = b.call(clock, [])
    for phi, value in ((last, seq), (since, now), (polls, i64(0))):
        phi.add_incoming(value, b.block)
    b.branch(head)

    b.position_at_end(idle)
    stop = b.icmp_signed("!=", b.load_atomic(_field(b, ctl, STOP), "acquire", 8, typ=I64), i64(0))
    elapsed = b.sub(b.call(clock, []), since)
    with b.if_then(b.or_(stop, b.icmp_unsigned(">", elapsed, i64(IDLE_CYCLES)))):
        # leave only from "waiting" (1 -> 0); a caller that moved it to 2 is posting a call: run it first
        gone = b.cmpxchg(_field(b, ctl, STATE), i64(1), i64(0), "acq_rel", "acquire")
        b.cbranch(b.extract_value(gone, 1), leave, again)
        b.position_at_end(again)
    # spinning only briefly: on a machine with more threads than cores, a thread that spins for long loses its
    # turns to the scheduler's fairness, and the barriers of the next call wait for it
    with b.if_then(b.icmp_unsigned(">", elapsed, i64(SPIN_CYCLES))):
        b.call(_libc(b.module, "usleep", [ir.IntType(32)]), [ir.Constant(ir.IntType(32), NAP_US)])
    for phi, value in ((last, last), (since, since), (polls, b.add(polls, i64(1)))):
        phi.add_incoming(value, b.block)
    b.branch(head)

    b.position_at_end(leave)
    b.ret_void()


def _emit_wait(module: ir.Module) -> None:
    """``split_wait(ctl, seq)``: wait until the server has run call `seq`."""
    fn = ir.Function(module, ir.FunctionType(emit.VOID, [PTR, I64]), name="split_wait")
    fn.attributes.add("nounwind")
    ctl, seq = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    entry = b.block
    head, done = fn.append_basic_block("head"), fn.append_basic_block("done")
    b.branch(head)
    b.position_at_end(head)
    polls = b.phi(I64, "polls")
    polls.add_incoming(i64(0), entry)
    ran = b.icmp_signed("==", b.load_atomic(_field(b, ctl, DONE), "acquire", 8, typ=I64), seq)
    body = fn.append_basic_block("poll")
    b.cbranch(ran, done, body)
    b.position_at_end(body)
    _spin(b, polls)
    polls.add_incoming(b.add(polls, i64(1)), b.block)
    b.branch(head)
    b.position_at_end(done)
    b.ret_void()
