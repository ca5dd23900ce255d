"""A compiled network -> an ONNX model: one node per cnnc layer, cnnc's names kept (``Model.export_onnx``).

It reads only the manifest (``manifest["graph"]``: the checked layers, which the
compiler records) and the weights, so a network loaded from an artifact with
the runtime alone exports as well as a freshly compiled one; the ``onnx``
package is the one thing it needs besides (the ``onnx`` extra).

Layer ``c1`` becomes node ``c1`` whose output tensor is ``c1``; its
parameters are the initializers ``c1.weight`` and ``c1.bias``. A layer that
ONNX spells with several nodes (gelu, silu) names its inner tensors
``c1/...`` and its last one ``c1``. What ONNX cannot say travels in the
model's metadata (``cnnc.connect``: the connection tables, whose unconnected
weights are exported as exact zeros; ``cnnc.fixed``: layers whose weights were
written in the source; ``cnnc.normalize``: the train section's input
normalization), so that ``cnnc import`` restores them.

The graph is the network on its input as ``Model.infer_into`` takes it: the
input rule's padding, uint8 scaling and ``normalize`` (``cnnc_runtime.inputs``)
come before it, as torchvision's transforms come before a PyTorch export.

``EXPORT`` maps every cnnc op to the function that writes its nodes
(``tests/onnx/test_export.py`` checks it covers the op table).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnc_runtime import __version__
from cnnc_runtime.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from cnnc_runtime.engine import Engine

OPSET = 17  # the floor every current runtime reads (onnxruntime, TensorRT, OpenVINO); Gelu is spelled with Erf
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12): loadable by every onnxruntime since 1.12
BATCH = "N"  # the batch dimension's symbolic name in the exported input and output


def require_onnx() -> Any:
    """The ``onnx`` module, or an ImportError naming the extra to install."""
    try:
        import onnx  # (optional dependency, the onnx extra: only exporting needs it)
    except ImportError:
        raise ImportError("ONNX export needs the 'onnx' package: pip install 'cnnc[onnx]'") from None
    return onnx


class Builder:
    """Collects the nodes and initializers of the graph being written."""

    def __init__(self, onnx: Any, params: Mapping[str, np.ndarray], layout: Mapping[str, dict]) -> None:
        self.onnx = onnx
        self.params = params
        self.layout = layout
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.metadata: dict[str, dict] = {"cnnc.connect": {}, "cnnc.fixed": {}}

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Add node `name` writing tensor `name`; returns the tensor's name."""
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def param(self, name: str, mask: np.ndarray | None = None) -> str:
        """Initializer `name` from the model's parameter (times `mask`, for a connection table)."""
        value = np.asarray(self.params[name], dtype=np.float32)
        return self.constant(name, value if mask is None else value * mask)


def _pads(geometry: dict) -> list[int]:
    top, bottom, left, right = geometry["pads"]
    return [top, left, bottom, right]  # ONNX: all the starts, then all the ends


def _conv(b: Builder, layer: dict) -> None:
    a, geo, name = layer["args"], layer["geometry"], layer["name"]
    mask = None
    if a.get("connect"):
        out, cin = b.params[f"{name}.weight"].shape[:2]
        mask = np.zeros((out, cin, 1, 1), dtype=np.float32)
        for o, row in enumerate(a["connect"]):
            mask[o, row] = 1.0
        b.metadata["cnnc.connect"][name] = {"table": a["connect_name"], "rows": a["connect"]}
    inputs = [layer["inputs"][0], b.param(f"{name}.weight", mask)]
    if a["bias"]:
        inputs.append(b.param(f"{name}.bias"))
    if b.layout[f"{name}.weight"]["fixed"] is not None:
        b.metadata["cnnc.fixed"][name] = True
    b.node("Conv", inputs, name, kernel_shape=list(geo["k"]), strides=list(a["stride"]), pads=_pads(geo),
           dilations=list(a["dilation"]), group=a["groups"])


def _pool(op: str, **extra: Any) -> Callable[[Builder, dict], None]:
    def write(b: Builder, layer: dict) -> None:
        geo = layer["geometry"]
        b.node(op, layer["inputs"], layer["name"], kernel_shape=list(geo["k"]), strides=list(geo["stride"]),
               pads=_pads(geo), **extra)
    return write


def _global_avgpool(b: Builder, layer: dict) -> None:
    # (ReduceMean drops the spatial axes in one node: cnnc's global_avgpool gives C, not Cx1x1)
    b.node("ReduceMean", layer["inputs"], layer["name"], axes=[2, 3], keepdims=0)


def _dense(b: Builder, layer: dict) -> None:
    name = layer["name"]
    inputs = [layer["inputs"][0], b.param(f"{name}.weight")]
    if layer["args"]["bias"]:
        inputs.append(b.param(f"{name}.bias"))
    b.node("Gemm", inputs, name, transB=1)


def _unary(op: str, *names: str) -> Callable[[Builder, dict], None]:
    """An activation that is one ONNX node; `names` are its arguments, the same in cnnc and ONNX."""
    def write(b: Builder, layer: dict) -> None:
        b.node(op, layer["inputs"], layer["name"], **{n: float(layer["args"][n]) for n in names})
    return write


def _gelu(b: Builder, layer: dict) -> None:
    """x (1 + erf(x / sqrt 2)) / 2, as opset 17 spells it (``Gelu`` arrives in opset 20)."""
    x, name = layer["inputs"][0], layer["name"]
    scalar = lambda tag, v: b.constant(f"{name}/{tag}", np.array(v, dtype=np.float32))
    t = b.node("Div", [x, scalar("sqrt2", math.sqrt(2.0))], f"{name}/div")
    t = b.node("Erf", [t], f"{name}/erf")
    t = b.node("Add", [t, scalar("one", 1.0)], f"{name}/add")
    t = b.node("Mul", [x, t], f"{name}/mul")
    b.node("Mul", [t, scalar("half", 0.5)], name)


def _silu(b: Builder, layer: dict) -> None:
    x, name = layer["inputs"][0], layer["name"]
    b.node("Mul", [x, b.node("Sigmoid", [x], f"{name}/sigmoid")], name)


def _dropout(b: Builder, layer: dict) -> None:
    ratio = b.constant(f"{layer['name']}/ratio", np.array(layer["args"]["p"], dtype=np.float32))
    b.node("Dropout", [layer["inputs"][0], ratio], layer["name"])


def _batchnorm(b: Builder, layer: dict) -> None:
    """The running statistics are inputs, as ONNX's BatchNormalization takes them; ONNX's momentum weighs the old
    statistic, cnnc's (PyTorch's) the new one."""
    name, a = layer["name"], layer["args"]
    inputs = [layer["inputs"][0], *(b.param(f"{name}.{k}") for k in ("weight", "bias", "running_mean", "running_var"))]
    b.node("BatchNormalization", inputs, name, epsilon=float(a["eps"]), momentum=1.0 - float(a["momentum"]))


def _add(b: Builder, layer: dict) -> None:
    b.node("Add" if len(layer["inputs"]) == 2 else "Sum", layer["inputs"], layer["name"])


EXPORT: dict[str, Callable[[Builder, dict], None]] = {
    "input": lambda b, layer: None,  # (a graph input, written by to_onnx)
    "conv": _conv,
    "maxpool": _pool("MaxPool"),
    "avgpool": _pool("AveragePool", count_include_pad=1),  # cnnc's avgpool divides by the whole window
    "global_avgpool": _global_avgpool,
    "dense": _dense,
    "batchnorm": _batchnorm,
    "flatten": lambda b, layer: b.node("Flatten", layer["inputs"], layer["name"], axis=1),
    "relu": _unary("Relu"),
    "sigmoid": _unary("Sigmoid"),
    "tanh": _unary("Tanh"),
    "leaky_relu": _unary("LeakyRelu", "alpha"),
    "elu": _unary("Elu", "alpha"),
    "gelu": _gelu,
    "silu": _silu,
    "softmax": lambda b, layer: b.node("Softmax", layer["inputs"], layer["name"], axis=1),
    "dropout": _dropout,
    "add": _add,
    "concat": lambda b, layer: b.node("Concat", layer["inputs"], layer["name"], axis=1),
}


def to_onnx(graph: list[dict], params: Mapping[str, np.ndarray], layout: list[dict], network: str,
            output: str, normalize: dict | None = None) -> Any:
    """The ``onnx.ModelProto`` of a network described as ``manifest["graph"]``, with these parameter values.

    It passes ``onnx.checker.check_model(full_check=True)`` and strict shape inference (checked here).
    """
    onnx = require_onnx()
    helper = onnx.helper
    b = Builder(onnx, params, {p["name"]: p for p in layout})
    for layer in graph:
        EXPORT[layer["op"]](b, layer)
    inp = next(layer for layer in graph if layer["op"] == "input")
    out = next(layer for layer in graph if layer["name"] == output)
    value = lambda layer: helper.make_tensor_value_info(layer["name"], onnx.TensorProto.FLOAT,
                                                        [BATCH, *layer["shape"]])
    g = helper.make_graph(b.nodes, network, [value(inp)], [value(out)], b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="cnnc", producer_version=__version__,
                              doc_string=f"network {network}, exported by cnnc {__version__}")
    if normalize:
        b.metadata["cnnc.normalize"] = normalize
    meta = {k: json.dumps(v, sort_keys=True) for k, v in b.metadata.items() if v}
    helper.set_model_props(model, {"cnnc.network": network, **meta})
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model


def export_model(model: Engine, path: str | os.PathLike[str]) -> None:
    """Write `model` (its network and current weights) to `path` as ONNX, atomically."""
    m = model.manifest
    graph = m.get("graph")
    if graph is None:
        raise ValueError(f"network {model.name}: this artifact predates ONNX export; recompile it")
    values = {**model.params, **model.buffers}  # (batchnorm's running statistics are buffers)
    proto = to_onnx(graph, values, m["params"], m["network"], m["output"]["name"],
                    m.get("train", {}).get("normalize"))
    atomic_write_bytes(path, proto.SerializeToString())
