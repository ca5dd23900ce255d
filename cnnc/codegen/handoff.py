"""Handing one image's second share to a pool thread that waits in native code: ``split_call`` and
``split_serve``.

Waking a pool thread through Python (an event, the GIL, a ctypes call) costs
tens of microseconds a call: a tenth of a ResNet-20 image. Instead the thread
runs ``split_serve(ctl)``, which spins (yielding its core after a while) on a
control block and runs each posted call of ``infer_split`` as part 1, and
returns only after ``IDLE_CYCLES`` without one (or when told to stop), so a
loop of small calls finds it waiting. The caller's ``split_call`` posts the
call, runs part 0 and waits for part 1, all in one native call: no Python runs
between the post and the end of both parts, so an interrupt (Ctrl-C is raised
as a native call returns) finds either nothing posted or the whole call done,
never a server waiting at a barrier for a part 0 that will not come.

The block (int64s, each field on a cache line of its own, ``cnnc_runtime.parallel``
owns it): ``state`` (0: no server; 1: a server waits; 2: a call is posted or
being posted), ``seq`` (the number of the last call posted), ``done`` (of the
last call run), ``stop``, then the call's arguments. A server starting moves
``state`` from 0 to 1 and leaves only by moving it from 1 to 0; a caller posts
only by moving it from 1 to 2, so a call is never posted to a server on its way
out: when the move fails, ``split_call`` returns 0 having posted and run
nothing, and the caller starts a server and calls again.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import I64, PTR, i64

STATE, SEQ, DONE, STOP, ARGS = 0, 8, 16, 24, 32  # int64 offsets in the block
ARG_NAMES = ["params", "folded", "arena", "x", "y", "ws", "bar", "n0", "n1"]  # infer_split's, but the part
INT64S = ARGS + len(ARG_NAMES)
IDLE_CYCLES = 6_000_000  # time-stamp counter ticks (~2 ms) without a call before a server returns: longer
# than a one-thread call of a small network, so that SplitChoice's probes of one thread do not send it away
SPIN_CYCLES = 100_000  # ticks (~30 us: a loop's Python between two calls) it spins before sleeping between polls
SPIN = 4000  # polls before a waiting thread starts yielding its core
YIELDS = 200  # yields before it sleeps between polls
NAP_US = 50


def emit_handoff(module: ir.Module, infer_split: ir.Function) -> None:
    """Emit ``split_call`` and ``split_serve`` for `infer_split` into `module`."""
    _emit_call(module, infer_split)
    _emit_serve(module, infer_split)


def _field(b: ir.IRBuilder, ctl: ir.Value, at: int) -> ir.Value:
    return b.gep(ctl, [i64(at)], source_etype=I64, inbounds=True)


def _emit_call(module: ir.Module, infer_split: ir.Function) -> None:
    """``split_call(ctl, seq, params, folded, arena, x, y, ws0, ws1, bar, n0, n1) -> ran``: when a server waits,
    post call `seq` (part 1, on `ws1`), run part 0 (on `ws0`), wait for part 1 and return 1; else return 0 having
    done nothing."""
    fn = ir.Function(module, ir.FunctionType(I64, [PTR, I64] + [PTR] * 8 + [I64, I64]), name="split_call")
    fn.attributes.add("nounwind")
    ctl, seq = fn.args[0], fn.args[1]
    params, folded, arena, x, y, ws0, ws1, bar, n0, n1 = fn.args[2:]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    taken = b.cmpxchg(_field(b, ctl, STATE), i64(1), i64(2), "acq_rel", "acquire")
    with b.if_then(b.not_(b.extract_value(taken, 1))):  # (no server waits)
        b.ret(i64(0))
    for k, value in enumerate([params, folded, arena, x, y, ws1, bar, n0, n1]):
        b.store(b.ptrtoint(value, I64) if value.type == PTR else value, _field(b, ctl, ARGS + k))
    b.atomic_rmw("xchg", _field(b, ctl, SEQ), seq, "release")
    b.call(infer_split, [params, folded, arena, x, y, ws0, bar, i64(0), n0, n1])
    _wait_done(b, ctl, seq)
    b.ret(i64(1))


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
    b.cmpxchg(_field(b, ctl, STATE), i64(0), i64(1), "acq_rel", "acquire")  # (waiting: calls may be posted)
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


def _wait_done(b: ir.IRBuilder, ctl: ir.Value, seq: ir.Value) -> None:
    """Wait (spinning, then yielding) until the server has run call `seq`."""
    entry = b.block
    fn = entry.function
    head, done = fn.append_basic_block("wait.head"), fn.append_basic_block("wait.done")
    b.branch(head)
    b.position_at_end(head)
    polls = b.phi(I64, "polls")
    polls.add_incoming(i64(0), entry)
    ran = b.icmp_signed("==", b.load_atomic(_field(b, ctl, DONE), "acquire", 8, typ=I64), seq)
    body = fn.append_basic_block("wait.poll")
    b.cbranch(ran, done, body)
    b.position_at_end(body)
    _spin(b, polls)
    polls.add_incoming(b.add(polls, i64(1)), b.block)
    b.branch(head)
    b.position_at_end(done)
