"""Optimizer updates over the flat parameter buffer, as native loops.

numpy needs a dozen passes over the buffers for one Adam step (about 0.1 ms
for LeNet-5's 61,706 parameters, 5% of a training step); one fused loop needs
a fraction of that. Each loop runs the rule of the optimizer table
(``cnnc_runtime.optimizers.OPTIMIZERS``) on vectors: the same float32
operations in the same order as its numpy form, without contracting a
multiply and an add into an FMA, so both give the same bits.

``update_KIND(params, grads, mask, s1, s2, hyper, n0, n1)`` updates elements
``[n0, n1)``; ``mask`` is the decay mask (1 for weights), ``s1``/``s2`` the
optimizer's state buffers (unused ones may be null) and ``hyper`` a small
float32 array of the step's constants, in the order of ``constant_names``.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.codegen import emit
from cnnc.codegen.emit import kernel
from cnnc.codegen.gemm import vector_loop
from cnnc_runtime.optimizers import OPTIMIZERS

ARGS = ["params", "grads", "mask", "s1", "s2", "hyper", "n0", "n1"]


class _VectorOps:
    """The rule's arithmetic as LLVM instructions (``cnnc_runtime.optimizers.Ops``)."""

    def __init__(self, b: ir.IRBuilder) -> None:
        self.b = b

    def add(self, x: ir.Value, y: ir.Value) -> ir.Value:
        return self.b.fadd(x, y)

    def sub(self, x: ir.Value, y: ir.Value) -> ir.Value:
        return self.b.fsub(x, y)

    def mul(self, x: ir.Value, y: ir.Value) -> ir.Value:
        return self.b.fmul(x, y)

    def div(self, x: ir.Value, y: ir.Value) -> ir.Value:
        return self.b.fdiv(x, y)

    def sqrt(self, x: ir.Value) -> ir.Value:
        return emit.intrinsic(self.b, "llvm.sqrt", x.type, [x])


def constants() -> dict[str, list[str]]:
    """Each update loop's constants, in order (the manifest's ``updates``: the runtime checks them)."""
    return {kind: list(cls.constant_names) for kind, cls in OPTIMIZERS.items()}


def emit_update(module: ir.Module, name: str, kind: str, vw: int) -> ir.Function:
    """``update_KIND``: the rule of optimizer `kind` for n0 <= i < n1; params and state updated in place."""
    cls = OPTIMIZERS[kind]
    fn, b, args = kernel(module, name, ARGS, noalias=True)
    scalars = {h: emit.load(b, args["hyper"], i) for i, h in enumerate(cls.constant_names)}
    buffers = [args["s1"], args["s2"]][:len(cls.buffers)]

    def body(b: ir.IRBuilder, i: ir.Value, width: int) -> None:
        h = {k: emit.splat(b, v, width) for k, v in scalars.items()}
        p, state = cls.rule(_VectorOps(b), h, emit.load(b, args["params"], i, width),
                            emit.load(b, args["grads"], i, width), emit.load(b, args["mask"], i, width),
                            tuple(emit.load(b, s, i, width) for s in buffers))
        for buf, value in zip(buffers, state):
            emit.store(b, value, buf, i)
        emit.store(b, p, args["params"], i)

    vector_loop(b, args["n0"], args["n1"], vw, body, name="u")
    b.ret_void()
    return fn
