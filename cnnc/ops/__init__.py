"""The op table: every operation the language knows, by name.

Adding an op means one ``OpDef`` in a module here (arguments, shape rule,
parameters, MACs) plus its kernels and gradient in ``cnnc.codegen.lowering``.
"""

from __future__ import annotations

from cnnc.ir import OpDef
from cnnc.ops import conv, dense, pool, simple

OPS: dict[str, OpDef] = {
    op.name: op
    for op in (
        simple.INPUT,
        conv.CONV,
        pool.MAXPOOL,
        pool.AVGPOOL,
        pool.GLOBAL_AVGPOOL,
        dense.DENSE,
        simple.FLATTEN,
        simple.RELU,
        simple.SIGMOID,
        simple.TANH,
        simple.LEAKY_RELU,
        simple.SOFTMAX,
        simple.DROPOUT,
        simple.ADD,
        simple.CONCAT,
    )
}

LAYERS = sorted(name for name in OPS if name != "input")
