"""An ONNX model -> cnnc layers -> a readable .cnn file and its weights.

``IMPORT`` maps each ONNX op type cnnc reads to its handler; any other op
is refused with ``node 'NAME' (OpType): not supported by cnnc``. Handlers see
three kinds of values: constants (initializers, ``Constant`` nodes and what
the exporter computes from them, folded here with numpy), tensors (the
output of a cnnc layer) and pending element-wise arithmetic. Arithmetic
becomes a layer only when something needs its value: a lone ``Relu`` is a
relu, ``Add`` of two tensors is an add, and any other chain of element-wise
nodes on one tensor (SiLU as ``Sigmoid`` and ``Mul``, GELU as ``Erf``
arithmetic) is evaluated on probe values and matched against the
activations' own float64 references (``cnnc.ops.activations``), so no
arrangement of the same formula is missed and no other formula is taken for it.

PyTorch's patterns: batch normalization becomes a trainable batchnorm
layer with its running statistics (the exporters often fold it into the
convolution before it already); global average pooling may be
``GlobalAveragePool`` or ``ReduceMean`` over the spatial axes; flattening
may be ``Flatten`` or a ``Reshape`` whose target is computed from ``Shape``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.errors import CnnError
from cnnc.onnx import require_onnx
from cnnc.onnx.cnnfile import Layer, Named, as_text, identifier, nested, number, size, write
from cnnc.ops.activations import TABLE as ACTIVATIONS
from cnnc.ops.activations import erf
from cnnc.ops.common import resolve_padding

BATCH = -(1 << 40)  # the batch size inside shape arithmetic (``Shape`` of a tensor): never a real size


class Refused(CnnError):
    """A node cnnc cannot take, named with its op type and the reason."""

    def __init__(self, node: Any, why: str) -> None:
        super().__init__(f"node '{node.name or node.output[0]}' ({node.op_type}): {why}")


@dataclass(frozen=True)
class Tensor:
    """A tensor computed by the network: the output of layer `layer` (-1: the input).

    ``shape`` is cnnc's (no batch); ``onnx_shape`` is the ONNX one without the batch, which differs after
    global pooling (C in cnnc, Cx1x1 in ONNX until a flatten)."""

    layer: int
    shape: tuple[int, ...]
    onnx_shape: tuple[int, ...]


@dataclass(frozen=True)
class Pending:
    """Element-wise arithmetic, lowered to a layer when a consumer needs it (``Importer.tensor``)."""

    node: Any


@dataclass(frozen=True)
class Bound:
    """A parameter given as a graph input at run time (ONNX's backend tests): `fn` maps the input to it."""

    input: str
    shape: tuple[int, ...]
    fn: Callable[[np.ndarray], np.ndarray] = lambda v: v

    def then(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> Bound:
        return Bound(self.input, shape, lambda v, f=self.fn: fn(f(v)))


@dataclass
class Imported:
    """What an import produces: the .cnn text, the weights (cnnc's parameter names) and how to run it."""

    text: str
    weights: dict[str, np.ndarray]
    input_name: str
    output_shape: tuple[int, ...]  # ONNX's, without the batch (cnnc's output is reshaped to it)
    bound: dict[str, Bound] = field(default_factory=dict)  # parameter -> graph input (weight_inputs=True)


class Importer:
    """Walks the graph once in order; handlers add layers and record what each ONNX value is."""

    def __init__(self, model: Any, weight_inputs: bool = False) -> None:
        self.onnx = require_onnx()
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.layers: list[Layer] = []
        self.values: dict[str, Any] = {}
        self.uses = Counter(i for n in self.graph.node for i in n.input if i)
        self.uses.update(o.name for o in self.graph.output)
        self.meta = {as_text(p.key): p.value for p in model.metadata_props}
        self.connect = self.metadata("cnnc.connect", {}, lambda v: isinstance(v, dict) and all(
            isinstance(t, dict) and isinstance(t.get("table"), str) and isinstance(t.get("rows"), list)
            and all(isinstance(r, list) and all(isinstance(i, int) for i in r) for r in t["rows"])
            for t in v.values()))
        self.fixed = self.metadata("cnnc.fixed", {}, lambda v: isinstance(v, dict))
        self.normalize = self.metadata("cnnc.normalize", None, lambda v: isinstance(v, dict) and all(
            isinstance(v.get(k), (int, float)) or (isinstance(v.get(k), list) and v[k]
                                                    and all(isinstance(x, (int, float)) for x in v[k]))
            for k in ("mean", "std")))
        self.batch: int | None = None
        for t in self.graph.initializer:
            try:
                self.values[t.name] = self.onnx.numpy_helper.to_array(t)
            except (ValueError, TypeError, KeyError) as e:  # (data that does not fill its dims, an unknown type)
                raise CnnError(f"initializer '{t.name}' cannot be read ({e})") from None
        self._inputs(weight_inputs)

    def metadata(self, key: str, default: Any, valid: Callable[[Any], bool]) -> Any:
        """cnnc's own metadata entry `key` (JSON written by ``cnnc export``), checked with `valid`."""
        if key not in self.meta:
            return default
        try:
            value = json.loads(self.meta[key])
        except (ValueError, TypeError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            value = None
        if value is None or not valid(value):
            raise CnnError(f"metadata '{key}' is damaged: not what cnnc export writes")
        return value

    # ---- values --------------------------------------------------------------------------------

    def _inputs(self, weight_inputs: bool) -> None:
        data = [i for i in self.graph.input if i.name not in self.values]
        if not data:
            raise CnnError("the graph has no input")
        if len(data) > 1 and not weight_inputs:
            names = ", ".join(i.name for i in data)
            raise CnnError(f"the graph has {len(data)} inputs ({names}); a cnnc network has one")
        x = data[0]
        if not x.type.HasField("tensor_type"):
            raise CnnError(f"input '{x.name}' is not a tensor (a sequence or an optional); cnnc takes tensors")
        tt = x.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if tt.elem_type != self.onnx.TensorProto.FLOAT or len(dims) not in (2, 4) or None in dims[1:]:
            raise CnnError(f"input '{x.name}': cnnc takes float32 N x C x H x W images or N x F vectors with "
                           f"known sizes; this one is {self._describe(tt)}")
        self.input_name = x.name
        self.batch = dims[0]
        shape = tuple(dims[1:])
        self.values[x.name] = Tensor(-1, shape, shape)
        for extra in data[1:]:
            self.values[extra.name] = Bound(extra.name, tuple(d.dim_value for d in extra.type.tensor_type.shape.dim))

    def _describe(self, tt: Any) -> str:
        dims = "x".join(as_text(d.dim_param) or str(d.dim_value) if (d.dim_param or d.HasField("dim_value"))
                        else "?" for d in tt.shape.dim)
        name = self.onnx.TensorProto.DataType.Name(tt.elem_type).lower() \
            if tt.elem_type in self.onnx.TensorProto.DataType.values() else f"type {tt.elem_type}"
        return f"{name} {dims or 'of unknown shape'}"

    def const(self, node: Any, i: int, what: str, default: Any = None, bound: bool = False) -> Any:
        """Input `i` of `node` as a numpy constant (or a ``Bound`` parameter when `bound`)."""
        if i >= len(node.input) or not node.input[i]:
            if default is None:
                raise Refused(node, f"needs its {what} input")
            return default
        v = self.values[node.input[i]]
        if isinstance(v, np.ndarray) or (bound and isinstance(v, Bound)):
            return v
        raise Refused(node, f"its {what} must be a constant (an initializer), not computed from the input")

    def tensor(self, name: str, node: Any) -> Tensor:
        """Value `name` as a tensor of the network, lowering pending arithmetic to layers."""
        v = self.values[name]
        if isinstance(v, Pending):
            v = self.values[name] = self._lower(v.node)
        if not isinstance(v, Tensor):
            raise Refused(node, f"input '{name}' is a constant where cnnc needs a tensor computed from the input")
        return v

    def layer(self, node: Any, op: str, inputs: list[Tensor], shape: tuple[int, ...],
              onnx_shape: tuple[int, ...] | None = None, **kw: Any) -> Tensor:
        """Add a layer for `node` and record its output."""
        hint = as_text(node.name or node.output[0])
        self.layers.append(Layer(op, [t.layer for t in inputs], hint=hint, **kw))
        t = Tensor(len(self.layers) - 1, shape, onnx_shape or shape)
        self.values[node.output[0]] = t
        return t

    def unused(self, node: Any, first: int) -> None:
        """Outputs from `first` on (max pooling's indices, dropout's mask) must feed nothing."""
        for name in node.output[first:]:
            if name and self.uses[name]:
                raise Refused(node, f"its output '{name}' is used; cnnc computes only the first output")

    def attrs(self, node: Any) -> dict[str, Any]:
        get = self.onnx.helper.get_attribute_value
        return {a.name: (v.decode() if isinstance(v := get(a), bytes) else v) for a in node.attribute}

    # ---- element-wise arithmetic ---------------------------------------------------------------

    def _lower(self, node: Any) -> Tensor:
        op, a = node.op_type, self.attrs(node)
        if op in ONE_ACTIVATION:
            act, args = ONE_ACTIVATION[op](node, a)
            x = self.tensor(node.input[0], node)
            return self.layer(node, act, [x], x.shape, x.onnx_shape, args=args)
        if op in ("Add", "Sum") and not any(isinstance(self.values[i], np.ndarray) for i in node.input):
            xs = [self.tensor(i, node) for i in node.input]
            if len({x.onnx_shape for x in xs}) > 1:
                raise Refused(node, "adds tensors of different shapes; cnnc's add takes equal shapes")
            return self.layer(node, "add", xs, xs[0].shape, xs[0].onnx_shape) if len(xs) > 1 else xs[0]
        found = self._match(node, set())
        for inner in ([] if found else self._inner(node)):  # a chain of two: silu(gelu(x)) is matched from the top
            found = self._match(node, {inner})
            if found:
                break
        if found is None:
            raise Refused(node, "element-wise arithmetic that is no activation cnnc has: not supported by cnnc")
        leaf, act = found
        x = self.tensor(leaf, node)
        if act == "identity":
            self.values[node.output[0]] = x
            return x
        return self.layer(node, act, [x], x.shape, x.onnx_shape)

    def _match(self, node: Any, stop: set[str]) -> tuple[str, str] | None:
        """(the one tensor, the activation) that `node`'s arithmetic computes, reading values in `stop` as given."""
        leaves: set[str] = set()
        self._collect(node, leaves, stop)
        if len(leaves) != 1:
            return None
        (leaf,) = leaves
        probe = np.concatenate([np.linspace(-8.0, 8.0, 1601), [-30.0, -1e-3, 0.0, 1e-3, 30.0]])
        with np.errstate(all="ignore"):
            y = self._evaluate(node.output[0], {leaf: probe})
        for name, act in (("identity", None), *ACTIVATIONS.items()):
            if act is not None and act.args:
                continue  # (activations with arguments come as their own ONNX nodes)
            want = probe if act is None else act.reference(probe, {})
            if np.allclose(y, want, rtol=1e-6, atol=1e-7):
                return leaf, name
        return None

    def _collect(self, node: Any, leaves: set[str], stop: set[str]) -> None:
        for name in node.input:
            v = self.values[name] if name else None
            if isinstance(v, np.ndarray):
                if v.size != 1:
                    raise Refused(node, f"element-wise arithmetic with a non-scalar constant '{name}' "
                                        f"{v.shape}: not supported by cnnc")
            elif isinstance(v, Pending) and name not in stop and not _is_sum_of_tensors(v.node, self.values):
                self._collect(v.node, leaves, stop)
            elif isinstance(v, (Pending, Tensor)):
                leaves.add(name)
            elif name:
                raise Refused(node, f"input '{name}' must be a constant")

    def _inner(self, node: Any) -> list[str]:
        """The pending values `node`'s arithmetic reads, nearest first."""
        order, todo = [], [node]
        while todo:
            for name in todo.pop(0).input:
                v = self.values.get(name)
                if isinstance(v, Pending) and name not in order:
                    order.append(name)
                    todo.append(v.node)
        return order

    def _evaluate(self, name: str, known: dict[str, np.ndarray]) -> np.ndarray:
        if name in known:
            return known[name]
        v = self.values[name]
        if isinstance(v, np.ndarray):
            return v.astype(np.float64).reshape(())
        node = v.node
        known[name] = EVALUATE[node.op_type]([self._evaluate(i, known) for i in node.input if i], self.attrs(node))
        return known[name]

    # ---- the walk ------------------------------------------------------------------------------

    def run(self) -> Tensor:
        for node in self.graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise Refused(node, f"an op of domain '{node.domain}': not supported by cnnc")
            handler = IMPORT.get(node.op_type)
            if handler is None:
                raise Refused(node, "not supported by cnnc")
            try:
                handler(self, node)
            except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
                # (a node the checker let through whose inputs or attributes do not fit its op: the file's fault)
                raise Refused(node, f"cannot be read ({type(e).__name__}: {e})") from None
        if len(self.graph.output) != 1:
            raise CnnError(f"the graph has {len(self.graph.output)} outputs; a cnnc network has one")
        out = self.graph.output[0]
        t = self.tensor(out.name, _OutputNode(out.name))
        if t.layer < 0:
            raise CnnError("the graph's output is its input: there is no layer to compile")
        return t


@dataclass(frozen=True)
class _OutputNode:
    """Stands for the graph output in messages."""

    name: str
    op_type: str = "graph output"

    @property
    def output(self) -> list[str]:
        return [self.name]


def _is_sum_of_tensors(node: Any, values: dict[str, Any]) -> bool:
    return node.op_type in ("Add", "Sum") and not any(isinstance(values[i], np.ndarray) for i in node.input)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return ACTIVATIONS["sigmoid"].reference(x, {})


EVALUATE: dict[str, Callable[[list[np.ndarray], dict], np.ndarray]] = {
    "Add": lambda v, a: v[0] + v[1],
    "Sum": lambda v, a: sum(v[1:], v[0]),
    "Sub": lambda v, a: v[0] - v[1],
    "Mul": lambda v, a: v[0] * v[1],
    "Div": lambda v, a: v[0] / v[1],
    "Pow": lambda v, a: np.power(v[0], v[1]),
    "Sqrt": lambda v, a: np.sqrt(v[0]),
    "Neg": lambda v, a: -v[0],
    "Exp": lambda v, a: np.exp(v[0]),
    "Erf": lambda v, a: erf(v[0]),
    "Relu": lambda v, a: np.maximum(v[0], 0.0),
    "Sigmoid": lambda v, a: _sigmoid(v[0]),
    "Tanh": lambda v, a: np.tanh(v[0]),
    "LeakyRelu": lambda v, a: np.where(v[0] > 0, v[0], a.get("alpha", 0.01) * v[0]),
    "Elu": lambda v, a: np.where(v[0] > 0, v[0], a.get("alpha", 1.0) * np.expm1(np.minimum(v[0], 0.0))),
    "Gelu": lambda v, a: ACTIVATIONS["gelu"].reference(v[0], {}),
}


def _gelu_args(node: Any, a: dict) -> tuple[str, dict]:
    if a.get("approximate", "none") != "none":
        raise Refused(node, "the tanh approximation of GELU: not supported by cnnc (its gelu is the exact form)")
    return "gelu", {}


def _alpha(act: str, default: float) -> Callable[[Any, dict], tuple[str, dict]]:
    def args(node: Any, a: dict) -> tuple[str, dict]:
        alpha = a.get("alpha", default)
        if alpha < 0:
            raise Refused(node, f"alpha {alpha} < 0: cnnc's {act} needs alpha >= 0")
        return act, ({"alpha": number(alpha)} if not math.isclose(alpha, default, rel_tol=1e-7) else {})
    return args


ONE_ACTIVATION: dict[str, Callable[[Any, dict], tuple[str, dict]]] = {
    "Relu": lambda node, a: ("relu", {}),
    "Sigmoid": lambda node, a: ("sigmoid", {}),
    "Tanh": lambda node, a: ("tanh", {}),
    "LeakyRelu": _alpha("leaky_relu", 0.01),
    "Elu": _alpha("elu", 1.0),
    "Gelu": _gelu_args,
}


def _elementwise(im: Importer, node: Any) -> None:
    """Fold constants now; a bias added to a conv or dense layer joins it; the rest waits (``Importer._lower``)."""
    vals = [im.values[i] for i in node.input if i]
    if all(isinstance(v, np.ndarray) for v in vals):
        with np.errstate(all="ignore"):
            folded = EVALUATE[node.op_type]([v.astype(np.float64) for v in vals], im.attrs(node))
        im.values[node.output[0]] = np.asarray(folded, dtype=vals[0].dtype)
        return
    if node.op_type == "Add" and _fold_bias(im, node, vals):
        return
    im.values[node.output[0]] = Pending(node)


def _fold_bias(im: Importer, node: Any, vals: list[Any]) -> bool:
    """Add(conv or dense without bias, per-channel constant) -> that layer's bias (MatMul + Add is a dense)."""
    consts = [v for v in vals if isinstance(v, np.ndarray)]
    tensors = [(i, v) for i, v in zip(node.input, vals) if isinstance(v, Tensor)]
    if len(consts) != 1 or len(tensors) != 1:
        return False
    (name, t), c = tensors[0], consts[0]
    if t.layer < 0 or im.uses[name] != 1:
        return False
    layer = im.layers[t.layer]
    if layer.op not in ("conv", "dense") or "bias" in layer.params:
        return False
    out = t.onnx_shape[0]
    squeezed = c.reshape(-1) if c.size == out else None
    per_channel = c.shape in ((out,), (1, out)) if layer.op == "dense" else c.shape in ((out, 1, 1), (1, out, 1, 1))
    if squeezed is None or not per_channel:
        return False
    layer.params["bias"] = Named(name, squeezed.astype(np.float32))
    layer.args.pop("bias", None)
    im.values[node.output[0]] = t
    return True


# ---- layers with parameters ----------------------------------------------------------------------


def _pads(im: Importer, node: Any, a: dict, hw: tuple[int, int], span: tuple[int, int],
          stride: tuple[int, int]) -> tuple[str | None, tuple[int, int, int, int]]:
    """(cnnc's pad argument or None for 0, (top, bottom, left, right)) from ``pads`` / ``auto_pad``."""
    same = resolve_padding({}, "same", hw, span, stride)
    auto = a.get("auto_pad", "NOTSET")
    if auto == "VALID":
        pads = (0, 0, 0, 0)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        t, b, left, r = same
        pads = same if auto == "SAME_UPPER" else (b, t, r, left)
    else:
        p = list(a.get("pads", [0, 0, 0, 0]))
        if len(p) != 4:
            raise Refused(node, f"pads {p}: cnnc takes 2-D windows")
        pads = (p[0], p[2], p[1], p[3])
    if pads == (0, 0, 0, 0):
        return None, pads
    if pads[0] == pads[1] and pads[2] == pads[3]:
        return size((pads[0], pads[2])), pads
    if pads == same:
        return "same", pads
    raise Refused(node, f"padding (top, bottom, left, right) = {pads} is neither symmetric nor 'same': "
                        "not supported by cnnc")


def _out_size(hw: tuple[int, int], pads: tuple, span: tuple[int, int], stride: tuple[int, int],
              ceil: bool = False) -> tuple[int, int]:
    total = (hw[0] + pads[0] + pads[1] - span[0], hw[1] + pads[2] + pads[3] - span[1])
    div = (lambda n, s: -(-n // s)) if ceil else (lambda n, s: n // s)
    return div(total[0], stride[0]) + 1, div(total[1], stride[1]) + 1


def _image(im: Importer, node: Any) -> Tensor:
    x = im.tensor(node.input[0], node)
    if len(x.onnx_shape) != 3 or len(x.shape) != 3:
        raise Refused(node, "needs an N x C x H x W input; cnnc's windows are 2-D")
    return x


def _param(im: Importer, node: Any, i: int, value: Any) -> Any:
    return value if isinstance(value, Bound) else Named(node.input[i], np.asarray(value, dtype=np.float32))


def _conv(im: Importer, node: Any) -> None:
    x, a = _image(im, node), im.attrs(node)
    w = im.const(node, 1, "weight", bound=True)
    b = im.const(node, 2, "bias", default=False, bound=True)
    if len(w.shape) != 4:
        raise Refused(node, f"weight of shape {tuple(w.shape)}: cnnc's conv is 2-D")
    out, _, kh, kw = w.shape
    k = tuple(a.get("kernel_shape", (kh, kw)))
    stride, dilation, groups = tuple(a.get("strides", (1, 1))), tuple(a.get("dilations", (1, 1))), a.get("group", 1)
    span = tuple(d * (n - 1) + 1 for n, d in zip(k, dilation))
    pad, pads = _pads(im, node, a, x.shape[1:], span, stride)
    args = {"out": str(out), "k": size(k)}
    if stride != (1, 1):
        args["stride"] = size(stride)
    if pad is not None:
        args["pad"] = pad
    if groups != 1:
        args["groups"] = str(groups)
    if dilation != (1, 1):
        args["dilation"] = size(dilation)
    if b is False:
        args["bias"] = "false"
    name = node.name or node.output[0]
    if name in im.fixed and isinstance(w, np.ndarray):
        args["weights"] = nested(w.astype(np.float32))
    table = None
    if name in im.connect:
        table = (im.connect[name]["table"], im.connect[name]["rows"])
    params = {"weight": _param(im, node, 1, w)}
    if b is not False:
        params["bias"] = _param(im, node, 2, b)
    im.layer(node, "conv", [x], (out, *_out_size(x.shape[1:], pads, span, stride)), args=args, params=params,
             table=table)


def _dense_from(im: Importer, node: Any, x: Tensor, out: int, weight: Any, bias: Any) -> None:
    args = {"out": str(out)}
    params = {"weight": weight}
    if bias is None:
        args["bias"] = "false"
    else:
        params["bias"] = bias
    im.layer(node, "dense", [x], (out,), args=args, params=params)


def _flat(im: Importer, node: Any) -> Tensor:
    x = im.tensor(node.input[0], node)
    if len(x.onnx_shape) != 1:
        raise Refused(node, f"needs a flat N x F input, got N x {'x'.join(map(str, x.onnx_shape))}")
    return x


def _gemm(im: Importer, node: Any) -> None:
    x, a = _flat(im, node), im.attrs(node)
    if a.get("transA", 0):
        raise Refused(node, "transA=1 (a transposed input): not supported by cnnc")
    alpha, beta, trans = a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transB", 0)
    b = im.const(node, 1, "weight", bound=True)
    if len(b.shape) != 2:
        raise Refused(node, f"weight of shape {tuple(b.shape)}: needs a matrix")
    out = b.shape[0] if trans else b.shape[1]
    as_weight = lambda v: np.asarray((v if trans else v.T) * alpha, dtype=np.float32)
    weight = b.then(as_weight, (out, x.shape[0])) if isinstance(b, Bound) else Named(node.input[1], as_weight(b))
    c = im.const(node, 2, "bias", default=False, bound=True)
    bias = None
    if c is not False:
        if math.prod(c.shape) not in (1, out) or (len(c.shape) == 2 and c.shape[0] != 1):
            raise Refused(node, f"bias of shape {tuple(c.shape)}: cnnc's dense adds one bias per output")
        as_bias = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float32).reshape(-1) * beta, (out,)).copy()
        bias = c.then(as_bias, (out,)) if isinstance(c, Bound) else Named(node.input[2], as_bias(c))
    _dense_from(im, node, x, out, weight, bias)


def _matmul(im: Importer, node: Any) -> None:
    x = _flat(im, node)
    b = im.const(node, 1, "weight")
    if b.ndim != 2:
        raise Refused(node, f"weight of shape {b.shape}: needs a matrix")
    _dense_from(im, node, x, b.shape[1], Named(node.input[1], np.asarray(b.T, dtype=np.float32)), None)


def _pytorch_momentum(onnx_momentum: float) -> float:
    """cnnc's (PyTorch's) momentum from ONNX's, 1 - m, as the shortest decimal that gives ONNX's float32 back."""
    for digits in range(1, 10):
        m = round(1.0 - onnx_momentum, digits)
        if np.float32(1.0 - m) == np.float32(onnx_momentum):
            return m
    return 1.0 - onnx_momentum


def _batchnorm(im: Importer, node: Any) -> None:
    """A batchnorm layer, trainable, with the running statistics as its state (cnnc folds it into a conv or dense
    before it for inference by itself)."""
    a = im.attrs(node)
    if a.get("training_mode", 0):
        raise Refused(node, "training_mode=1 (batch statistics in the graph): not supported by cnnc, whose "
                            "batchnorm uses them while training and the running statistics otherwise")
    im.unused(node, 1)
    x = im.tensor(node.input[0], node)
    if len(x.onnx_shape) != len(x.shape):
        raise Refused(node, "a batch normalization of a pooled N x C x 1 x 1 map: not supported by cnnc")
    args = {}
    eps = float(a.get("epsilon", 1e-5))
    if not math.isclose(eps, 1e-5, rel_tol=1e-6):
        args["eps"] = number(eps)
    momentum = _pytorch_momentum(float(a.get("momentum", 0.9)))
    if momentum != 0.1:
        args["momentum"] = number(momentum)
    names = ("weight", "bias", "running_mean", "running_var")
    params = {k: _param(im, node, i, im.const(node, i, k, bound=True)) for i, k in enumerate(names, 1)}
    im.layer(node, "batchnorm", [x], x.shape, x.onnx_shape, args=args, params=params)


# ---- layers without parameters -------------------------------------------------------------------


def _pool(op: str) -> Callable[[Importer, Any], None]:
    def handle(im: Importer, node: Any) -> None:
        x, a = _image(im, node), im.attrs(node)
        im.unused(node, 1)
        k = tuple(a["kernel_shape"])
        stride = tuple(a.get("strides", (1, 1)))
        if tuple(a.get("dilations", (1, 1))) != (1, 1):
            raise Refused(node, "dilated pooling: not supported by cnnc")
        pad, pads = _pads(im, node, a, x.shape[1:], k, stride)
        if max(pads[:2]) > k[0] // 2 or max(pads[2:]) > k[1] // 2:
            raise Refused(node, f"padding {pads} larger than half the {size(k)} window: not supported by cnnc")
        if op == "avgpool" and pad is not None and not a.get("count_include_pad", 0):
            raise Refused(node, "count_include_pad=0 with padding: cnnc's avgpool divides by the whole window "
                                "(count_include_pad=1)")
        oh_ow = _out_size(x.shape[1:], pads, k, stride)
        if a.get("ceil_mode", 0) and _out_size(x.shape[1:], pads, k, stride, ceil=True) != oh_ow:
            raise Refused(node, "ceil_mode=1 gives a larger output here: not supported by cnnc")
        args = {"k": size(k)}
        if stride != k:
            args["stride"] = size(stride)
        if pad is not None:
            args["pad"] = pad
        im.layer(node, op, [x], (x.shape[0], *oh_ow), args=args)
    return handle


def _global_avgpool(im: Importer, node: Any, keepdims: bool = True) -> None:
    x = _image(im, node)
    c = x.shape[0]
    im.layer(node, "global_avgpool", [x], (c,), (c, 1, 1) if keepdims else (c,))


def _reduce_mean(im: Importer, node: Any) -> None:
    a = im.attrs(node)
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = im.const(node, 1, "axes").tolist()
    if sorted(int(d) % 4 for d in (axes or [])) != [2, 3]:
        raise Refused(node, f"a mean over axes {axes}: cnnc takes the mean over the spatial axes (2, 3) only")
    _global_avgpool(im, node, bool(a.get("keepdims", 1)))


def _flatten_to(im: Importer, node: Any, x: Tensor) -> None:
    if len(x.shape) == 3:
        im.layer(node, "flatten", [x], (math.prod(x.shape),))
    else:  # already flat in cnnc (a vector, or global pooling's C x 1 x 1)
        im.values[node.output[0]] = Tensor(x.layer, x.shape, x.shape)


def _flatten(im: Importer, node: Any) -> None:
    x = im.tensor(node.input[0], node)
    axis = im.attrs(node).get("axis", 1)
    if axis % (len(x.onnx_shape) + 1) != 1:
        raise Refused(node, f"flatten at axis {axis}: cnnc flattens everything but the batch (axis 1)")
    _flatten_to(im, node, x)


def _reshape(im: Importer, node: Any) -> None:
    target = [int(d) for d in im.const(node, 1, "shape")]
    if isinstance(im.values[node.input[0]], np.ndarray):
        data = im.values[node.input[0]]
        if not im.attrs(node).get("allowzero", 0):
            target = [data.shape[i] if d == 0 else d for i, d in enumerate(target)]
        im.values[node.output[0]] = data.reshape(target)
        return
    x = im.tensor(node.input[0], node)
    zero_copies = not im.attrs(node).get("allowzero", 0)
    keeps_batch = target and (target[0] in (-1, BATCH, im.batch) or (target[0] == 0 and zero_copies))
    features = math.prod(x.onnx_shape)
    if keeps_batch and len(target) == 2 and target[1] in (-1, features):
        _flatten_to(im, node, x)
    elif keeps_batch and tuple(target[1:]) == x.onnx_shape:
        im.values[node.output[0]] = x
    else:
        shown = ["N" if d == BATCH else d for d in target]
        raise Refused(node, f"a reshape to {shown}: cnnc reshapes only to flatten (N x C*H*W)")


def _squeeze(im: Importer, node: Any) -> None:
    axes = im.attrs(node).get("axes")
    if axes is None and len(node.input) > 1:
        axes = im.const(node, 1, "axes").tolist()
    v = im.values[node.input[0]]
    if isinstance(v, np.ndarray):
        im.values[node.output[0]] = np.squeeze(v, axis=tuple(axes) if axes is not None else None)
        return
    x = im.tensor(node.input[0], node)
    if x.onnx_shape[1:] == (1, 1) and sorted(int(d) % 4 for d in axes or [2, 3]) == [2, 3]:
        im.values[node.output[0]] = Tensor(x.layer, x.shape, (x.shape[0],))
    else:
        raise Refused(node, f"squeezing axes {axes} of N x {'x'.join(map(str, x.onnx_shape))}: not supported")


def _concat(im: Importer, node: Any) -> None:
    vals = [im.values[i] for i in node.input]
    axis = im.attrs(node)["axis"]
    if all(isinstance(v, np.ndarray) for v in vals):
        im.values[node.output[0]] = np.concatenate(vals, axis=axis)
        return
    xs = [im.tensor(i, node) for i in node.input]
    rank = len(xs[0].onnx_shape) + 1
    if axis % rank != 1 or any(len(x.onnx_shape) + 1 != rank for x in xs) or rank not in (2, 4):
        raise Refused(node, f"concat along axis {axis}: cnnc joins along the channels (axis 1) only")
    if len({x.onnx_shape[1:] for x in xs}) > 1:
        raise Refused(node, "concat of maps of different sizes")
    channels = sum(x.shape[0] for x in xs)
    im.layer(node, "concat", xs, (channels, *xs[0].shape[1:]), (channels, *xs[0].onnx_shape[1:]))


def _dropout(im: Importer, node: Any) -> None:
    im.unused(node, 1)
    ratio = float(im.attrs(node).get("ratio", 0.5))
    if im.opset >= 12:
        ratio = float(im.const(node, 1, "ratio", default=np.array(0.5)))
        if bool(im.const(node, 2, "training_mode", default=np.array(False))):
            raise Refused(node, "training_mode=True: cnnc's dropout is the identity outside training")
    x = im.tensor(node.input[0], node)
    if ratio == 0.0:
        im.values[node.output[0]] = x
    else:
        im.layer(node, "dropout", [x], x.shape, x.onnx_shape, args={"p": number(ratio)})


def _softmax(im: Importer, node: Any) -> None:
    x = im.tensor(node.input[0], node)
    rank = len(x.onnx_shape) + 1
    axis = im.attrs(node).get("axis", -1 if im.opset >= 13 else 1) % rank
    if axis != 1 or (rank != 2 and im.opset < 13):
        raise Refused(node, f"softmax over axis {axis} of a rank-{rank} tensor: cnnc's softmax is over the channels")
    im.layer(node, "softmax", [x], x.shape, x.onnx_shape)


def _identity(im: Importer, node: Any) -> None:
    im.values[node.output[0]] = im.values[node.input[0]]


# ---- constants and shape arithmetic --------------------------------------------------------------


def _constant(im: Importer, node: Any) -> None:
    (name, v), = im.attrs(node).items()
    if name == "value":
        im.values[node.output[0]] = im.onnx.numpy_helper.to_array(v)
    elif name in ("value_float", "value_floats"):
        im.values[node.output[0]] = np.array(v, dtype=np.float32)
    elif name in ("value_int", "value_ints"):
        im.values[node.output[0]] = np.array(v, dtype=np.int64)
    else:
        raise Refused(node, f"a constant given as {name}: not supported by cnnc")


def _shape(im: Importer, node: Any) -> None:
    v = im.values[node.input[0]]
    dims = np.array(v.shape if isinstance(v, np.ndarray) else (BATCH, *im.tensor(node.input[0], node).onnx_shape),
                    dtype=np.int64)
    a = im.attrs(node)
    im.values[node.output[0]] = dims[a.get("start", 0):a.get("end", len(dims))]


def _on_constants(fn: Callable[[Importer, Any, list[np.ndarray], dict], np.ndarray]) -> Callable[[Importer, Any],
                                                                                                  None]:
    """A handler for shape arithmetic: every input must be a constant."""
    def handle(im: Importer, node: Any) -> None:
        vals = [im.const(node, i, f"input {i}") if name else None for i, name in enumerate(node.input)]
        im.values[node.output[0]] = np.asarray(fn(im, node, vals, im.attrs(node)))
    return handle


def _unsqueeze(im: Importer, node: Any, v: list, a: dict) -> np.ndarray:
    axes = a["axes"] if "axes" in a else v[1].tolist()
    out = v[0]
    for ax in sorted(int(d) % (v[0].ndim + len(axes)) for d in axes):
        out = np.expand_dims(out, ax)
    return out


def _slice(im: Importer, node: Any, v: list, a: dict) -> np.ndarray:
    data, starts, ends = v[0], v[1], v[2]
    axes = v[3] if len(v) > 3 and v[3] is not None else range(len(starts))
    steps = v[4] if len(v) > 4 and v[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax)] = slice(int(s), int(min(max(e, -(1 << 62)), 1 << 62)), int(st))
    return data[tuple(index)]


IMPORT: dict[str, Callable[[Importer, Any], None]] = {
    "Conv": _conv,
    "BatchNormalization": _batchnorm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MaxPool": _pool("maxpool"),
    "AveragePool": _pool("avgpool"),
    "GlobalAveragePool": _global_avgpool,
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Concat": _concat,
    "Dropout": _dropout,
    "Identity": _identity,
    "Softmax": _softmax,
    **{op: _elementwise for op in EVALUATE},
    "Constant": _constant,
    "Shape": _shape,
    "Unsqueeze": _on_constants(_unsqueeze),
    "Gather": _on_constants(lambda im, node, v, a: np.take(v[0], v[1], axis=a.get("axis", 0))),
    "Cast": _on_constants(lambda im, node, v, a: v[0].astype(im.onnx.helper.tensor_dtype_to_np_dtype(a["to"]))),
    "Slice": _on_constants(_slice),
    "ConstantOfShape": _on_constants(
        lambda im, node, v, a: np.full(v[0].astype(np.int64),
                                       im.onnx.numpy_helper.to_array(a["value"]).reshape(())
                                       if "value" in a else np.float32(0))),
}


def import_model(model: Any, name: str = "model", weight_inputs: bool = False) -> Imported:
    """Translate an ``onnx.ModelProto`` to .cnn text and weights; ``CnnError`` for what cnnc cannot take.

    With `weight_inputs`, graph inputs after the first are parameters given at run time (``Imported.bound``).
    """
    im = Importer(model, weight_inputs)
    with np.errstate(all="ignore"):  # (what overflows is refused below, by name)
        out = im.run()
    producer = " ".join(as_text(p) for p in (model.producer_name, model.producer_version) if p) or "an unknown producer"
    header = f"Imported by cnnc from {name} (written by {producer}, opset {im.opset})."
    network = im.meta.get("cnnc.network") or model.graph.name or Path(name).stem
    input_name = im.input_name
    text, params = write(network, identifier(input_name), im.values[input_name].shape, im.layers, out.layer,
                         "cnnc.network" in im.meta, header, im.normalize)
    weights = {k: v for k, v in params.items() if not isinstance(v, Bound)}
    bound = {k: v for k, v in params.items() if isinstance(v, Bound)}
    for k, v in weights.items():
        with np.errstate(all="ignore"):
            if not np.isfinite(np.asarray(v, dtype=np.float32)).all():
                raise CnnError(f"parameter {k} holds values that are not finite in float32 (NaN, infinity, or "
                               f"beyond +-3.4e38)")
    for k, v in bound.items():
        weights[k] = np.zeros(v.shape, dtype=np.float32)
    return Imported(text, {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}, input_name,
                    out.onnx_shape, bound)


def load(path: str | os.PathLike[str]) -> Any:
    """Read an ONNX file (with its external data, e.g. the ``.data`` file of ``torch.onnx.export(dynamo=True)``)."""
    onnx = require_onnx()
    try:
        model = onnx.load(os.fspath(path))
        onnx.checker.check_model(model)
    except FileNotFoundError as e:
        raise CnnError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # (onnx raises DecodeError, ValidationError, OSError... for a bad file)
        raise CnnError(f"{path}: not a valid ONNX model ({str(e).strip().splitlines()[0][:300]})") from None
    return model


def import_file(path: str | os.PathLike[str]) -> Imported:
    """An ONNX file as .cnn text and weights; ``CnnError`` (naming the file and node) when cnnc cannot take it."""
    try:
        return import_model(load(path), Path(path).name)
    except CnnError as e:
        if e.loc is None and not e.message.startswith(str(path)):
            raise CnnError(f"{path}: {e.message}") from None
        raise
