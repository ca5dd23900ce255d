"""ONNX's backend interface (``onnx.backend.base.Backend``) on cnnc, the way ``onnxruntime.backend`` offers it.

    import cnnc.onnx.backend as backend
    rep = backend.prepare(onnx_model)        # import, compile to native code, load the weights
    outputs = rep.run([x])                   # runs the compiled code

This is what lets ``onnx.backend.test.BackendTest`` run ONNX's own node and model
tests through cnnc's kernels (``tests/onnx/test_backend.py``). Graph inputs after
the first are parameters given at run time (ONNX's node tests pass a
convolution's weights that way); they are copied into the model's parameters
on each ``run``. A model cnnc cannot take raises ``CnnError`` from ``prepare``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

import cnnc
from cnnc.onnx.import_ import Imported, import_model


class CnncRep(BackendRep):
    """A prepared model: cnnc's compiled network plus how to feed it ONNX's inputs."""

    def __init__(self, model: Any, imported: Imported, input_names: list[str],
                 shape: tuple[int, ...] | None = None) -> None:
        self.model = model
        self.imported = imported
        self.input_names = input_names
        self.shape = shape  # the input's and output's shape when the model runs on a view (``as_vectors``)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """(output,) for `inputs`: one array, a list in graph-input order, or a dict by input name."""
        if isinstance(inputs, dict):
            named = dict(inputs)
        else:
            arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            named = dict(zip(self.input_names, arrays))
        for param, bound in self.imported.bound.items():
            target = self.model.params if param in self.model.params else self.model.buffers  # (running statistics)
            target[param] = bound.fn(np.asarray(named[bound.input]))
        x = np.ascontiguousarray(named[self.imported.input_name], dtype=np.float32)
        if self.shape is not None:
            x = x.reshape(self.shape[0], -1)
        # (the graph's input is the network's: no input rule, whatever normalize the file's metadata names)
        y = self.model.infer_into(x, np.empty((len(x), *self.model.output_shape), dtype=np.float32))
        return (y.reshape(self.shape) if self.shape is not None else y.reshape(len(y), *self.imported.output_shape),)


ELEMENTWISE = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Gelu", "Dropout", "Identity", "Add", "Sum"}


def as_vectors(model: Any) -> tuple[Any, tuple[int, ...] | None]:
    """A model of element-wise nodes on a tensor of any rank, as the same model on N x F vectors.

    cnnc's tensors are N x F or N x C x H x W, while ONNX's node tests apply
    activations to 3x4x5 or 3-element tensors; element-wise results do not
    depend on the shape, so such a model runs on its input viewed as
    (first dimension) x (the rest). Returns (model, the original output shape),
    or (model, None) when the model is not of that kind or needs no view.
    """
    g = model.graph
    initializers = {t.name for t in g.initializer}
    data = [i for i in g.input if i.name not in initializers]
    if len(data) != 1 or len(g.output) != 1 or not all(n.op_type in ELEMENTWISE for n in g.node):
        return model, None
    dims = [d.dim_value for d in data[0].type.tensor_type.shape.dim]
    if len(dims) not in (1, 3) or 0 in dims:
        return model, None
    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    for value in (flat.graph.input[list(g.input).index(data[0])], flat.graph.output[0]):
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        shape.dim.add().dim_value = dims[0]
        shape.dim.add().dim_value = int(np.prod(dims[1:]))
    del flat.graph.value_info[:]
    return flat, tuple(dims)


class CnncBackend(Backend):
    """cnnc as an ONNX backend: CPU only, float32."""

    @classmethod
    def prepare(cls, model: Any, device: str = "CPU", **kwargs: Any) -> CnncRep:
        super().prepare(model, device, **kwargs)  # (onnx's checker)
        model, shape = as_vectors(model)
        imported = import_model(model, model.graph.name or "model", weight_inputs=True)
        compiled = cnnc.compile_string(imported.text, f"{model.graph.name or 'model'}.cnn", **kwargs)
        compiled.load_arrays(imported.weights, "the model's initializers")
        initializers = {t.name for t in model.graph.initializer}
        return CnncRep(compiled, imported, [i.name for i in model.graph.input if i.name not in initializers], shape)

    @classmethod
    def run_model(cls, model: Any, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


prepare = CnncBackend.prepare
run_model = CnncBackend.run_model
supports_device = CnncBackend.supports_device
