"""The op table: every operation the language knows, by name. See ``cnnc.ir.OpDef`` for the fields.

Everything about an op is found from its name here: its arguments and
defaults, shape rule, parameter shapes, MAC count, float64 reference forward
and gradient rule (``reference``, ``reference_grad``), and the kernel family
that lowers it (``lowering``: an entry of ``cnnc.codegen.lowering.FAMILIES``).
Passes, code generation, the reference interpreter and the summary look ops
up in ``OPS`` and nowhere else.

Adding an activation is one ``Activation`` entry in ``cnnc.ops.activations.TABLE``:
its arguments and defaults, float64 reference and derivative, ``grad_from``
(``"output"`` when the derivative can be written in terms of the output, else
``"input"``), ``he_init`` for ReLU-like ones, and its two LLVM expressions,
written in ``cnnc.codegen.activations`` (``f(b, x, args)`` and
``g(b, v, dy, args)``). Fusion, the kernels, autodiff, the reference and the
initialisation follow from the entry. Tests: the element-wise kernel tests
(three vector widths) and the fused conv and dense kernel tests take every
entry of the table by themselves (``tests/codegen/buffers.py``); give it a
PyTorch twin in ``tests.reference._torch_activations`` and use it in one of
the whole-network test networks (``tests.reference.NETWORKS``: native against
the float64 reference, gradients, PyTorch), both of which
``tests/ops/test_table.py`` insists on. Adding gelu took: its entry and
derivative here, its two kernel expressions (and ``erf``) in
``cnnc.codegen.activations``, one line of PyTorch twin and a test network.

Adding another op is an ``OpDef`` in a module here (arguments, shape rule,
parameters, MACs, reference and its gradient) plus, when no existing kernel
family lowers it, a family in ``cnnc.codegen.lowering`` (its forward and
backward emitters). ``tests/ops/test_table.py`` checks that every op has every part. Its ONNX spelling is
one entry of ``cnnc_runtime.onnx_export.EXPORT`` (``tests/onnx/test_export.py`` checks every op has one), and an
``IMPORT`` handler in ``cnnc.onnx.import_`` when ONNX has a node for it.
"""

from __future__ import annotations

from cnnc.ir import OpDef
from cnnc.ops import batchnorm, conv, dense, pool, simple
from cnnc.ops.activations import TABLE as ACTIVATIONS

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
        batchnorm.BATCHNORM,
        *simple.ACTIVATIONS,
        simple.SOFTMAX,
        simple.DROPOUT,
        simple.ADD,
        simple.CONCAT,
    )
}

LAYERS = sorted(name for name in OPS if name != "input")

__all__ = ["ACTIVATIONS", "LAYERS", "OPS"]
