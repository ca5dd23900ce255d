"""Optimizer updates over the flat parameter buffer, as native loops.

numpy needs a dozen passes over the buffers for one Adam step (about 0.1 ms
for LeNet-5's 61,706 parameters, 5% of a training step); one fused loop needs
a fraction of that. Each kernel performs exactly the float32 operations of its
numpy rule in ``cnnc_runtime.optimizers``, in the same order and without
contracting a multiply and an add into an FMA, so both give the same bits.

``update_KIND(params, grads, s1, s2, hyper, n0, n1)`` updates elements
``[n0, n1)``; ``s1``/``s2`` are the optimizer's state buffers (unused ones may
be null) and ``hyper`` a small float32 array of the step's constants, in the
order of ``HYPER[KIND]``.
"""

from __future__ import annotations

from collections.abc import Callable

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import kernel
from cnnc.codegen.gemm import vector_loop

ARGS = ["params", "grads", "s1", "s2", "hyper", "n0", "n1"]

# the float32 constants each update reads from `hyper`, computed by the runtime for every step
HYPER: dict[str, tuple[str, ...]] = {
    "sgd": ("lr",),
    "momentum": ("lr", "beta"),
    "rmsprop": ("lr", "beta", "one_minus_beta", "eps"),
    "adam": ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "sqrt_bias2", "eps", "step_size"),
}

Rule = Callable[[ir.IRBuilder, dict, ir.Value, list[ir.Value]], tuple[ir.Value, list[ir.Value]]]


def _sgd(b: ir.IRBuilder, h: dict, g: ir.Value, state: list[ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
    return b.fmul(g, h["lr"]), state


def _momentum(b: ir.IRBuilder, h: dict, g: ir.Value, state: list[ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
    v = b.fadd(b.fmul(state[0], h["beta"]), g)
    return b.fmul(v, h["lr"]), [v]


def _rmsprop(b: ir.IRBuilder, h: dict, g: ir.Value, state: list[ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
    s = b.fadd(b.fmul(state[0], h["beta"]), b.fmul(b.fmul(g, g), h["one_minus_beta"]))
    denom = b.fadd(emit.intrinsic(b, "llvm.sqrt", s.type, [s]), h["eps"])
    return b.fmul(b.fdiv(g, denom), h["lr"]), [s]


def _adam(b: ir.IRBuilder, h: dict, g: ir.Value, state: list[ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
    m = b.fadd(b.fmul(state[0], h["beta1"]), b.fmul(g, h["one_minus_beta1"]))
    v = b.fadd(b.fmul(state[1], h["beta2"]), b.fmul(b.fmul(g, g), h["one_minus_beta2"]))
    denom = b.fadd(b.fdiv(emit.intrinsic(b, "llvm.sqrt", v.type, [v]), h["sqrt_bias2"]), h["eps"])
    return b.fmul(b.fdiv(m, denom), h["step_size"]), [m, v]


RULES: dict[str, tuple[Rule, int]] = {"sgd": (_sgd, 0), "momentum": (_momentum, 1), "rmsprop": (_rmsprop, 1),
                                      "adam": (_adam, 2)}


def emit_update(module: ir.Module, name: str, kind: str, vw: int) -> ir.Function:
    """``update_KIND``: params[i] -= step(grads[i], state[i]) for n0 <= i < n1, state updated in place."""
    rule, n_state = RULES[kind]
    fn, b, args = kernel(module, name, ARGS, noalias=True)
    scalars = {h: emit.load(b, args["hyper"], i) for i, h in enumerate(HYPER[kind])}
    buffers = [args["s1"], args["s2"]][:n_state]

    def body(b: ir.IRBuilder, i: ir.Value, width: int) -> None:
        h = {k: emit.splat(b, v, width) for k, v in scalars.items()}
        delta, state = rule(b, h, emit.load(b, args["grads"], i, width),
                            [emit.load(b, s, i, width) for s in buffers])
        for buf, value in zip(buffers, state):
            emit.store(b, value, buf, i)
        emit.store(b, b.fsub(emit.load(b, args["params"], i, width), delta), args["params"], i)

    vector_loop(b, args["n0"], args["n1"], vw, body, name="u")
    b.ret_void()
    return fn
