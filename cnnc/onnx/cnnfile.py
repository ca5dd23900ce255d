"""Imported layers -> a readable .cnn file: bindings, layer calls with only the arguments that differ from the
defaults, connection tables, and the parameter names cnnc will give (the weights file's keys).

Layers arrive in a topological order. Each binding is a chain: a layer continues the binding of its only input
when that input is the binding's last layer and feeds nothing else. A network exported by cnnc keeps its
bindings (its layer names say which binding each layer belongs to), so exporting the imported file again gives
the same names; other networks get one binding per layer with parameters, named after its parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnc.ops import OPS

RESERVED = {"as", "block", "input", "network", "output", "table", "train", *OPS}


@dataclass
class Layer:
    """One cnnc layer: its op, input layers (indices; -1 is the network input), arguments as .cnn text
    (only those that differ from the defaults), parameter values and the name it was known by in ONNX."""

    op: str
    inputs: list[int]
    args: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    hint: str = ""
    table: tuple[str, list[list[int]]] | None = None  # (name, rows) of a connect table


def as_text(name: str | bytes) -> str:
    """A name from the file as text (protobuf hands out a name that is not valid UTF-8 as bytes)."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


def identifier(text: str | bytes) -> str:
    """`text` made a .cnn name: other characters become '_', never a keyword or a layer's name."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", as_text(text)).strip("_") or "x"
    if name[0].isdigit():
        name = "n" + name
    return name + "_" if name in RESERVED else name


def number(v: float) -> str:
    """The shortest decimal that reads back as the same float32."""
    s = str(np.float32(v))
    return s[:-2] if s.endswith(".0") and "e" not in s else s


def size(v: tuple[int, int] | list[int]) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"


def nested(a: np.ndarray) -> str:
    if a.ndim == 0:
        return number(float(a))
    return "[" + ", ".join(nested(x) for x in a) + "]"


def _cnnc_binding(name: str, op: str) -> str:
    """The binding a layer named by cnnc belongs to: ``f6.tanh`` and ``b.relu2`` -> ``f6``, ``b``; ``B.1`` -> ``B``."""
    head, _, last = name.rpartition(".")
    if head and (last.isdigit() or re.fullmatch(re.escape(op) + r"\d*", last)):
        return head
    return name


@dataclass
class _Binding:
    name: str
    layers: list[int]


def write(network: str, input_name: str, input_shape: tuple[int, ...], layers: list[Layer], output: int,
          cnnc_names: bool, header: str, normalize: dict | None = None) -> tuple[str, dict[str, Any]]:
    """(.cnn text, parameter values keyed by cnnc's names) for the layers that the output depends on; `normalize`
    (``{"mean": M, "std": S}``) becomes a train section's ``normalize``."""
    live = _live(layers, output)
    consumers = {i: 0 for i in live}
    for i in live:
        for j in layers[i].inputs:
            if j >= 0:
                consumers[j] += 1
    bindings: list[_Binding] = []
    of: dict[int, _Binding] = {}
    used = {input_name}
    for i in live:
        layer = layers[i]
        key = _cnnc_binding(layer.hint, layer.op) if cnnc_names else None
        src = layer.inputs[0] if len(layer.inputs) == 1 else None
        b = of.get(src) if src is not None and src >= 0 else None
        joins = (b is not None and b.layers[-1] == src and consumers[src] == 1 and src != output
                 and not OPS[layer.op].multi_input
                 and (key == _key(b, layers) if cnnc_names else not layer.params))
        if joins:
            b.layers.append(i)
        else:
            base = identifier(key if cnnc_names else _foreign_name(layer))
            name, n = base, 1
            while name in used:
                n += 1
                name = f"{base}_{n}"
            used.add(name)
            b = _Binding(name, [i])
            bindings.append(b)
        of[i] = b
    text, weights = _text(network, input_name, input_shape, layers, bindings, of, output, header)
    if normalize:
        value = lambda v: "[" + ", ".join(number(x) for x in v) + "]" if isinstance(v, list) else number(v)
        text += (f"\ntrain {{\n    normalize(mean={value(normalize['mean'])}, std={value(normalize['std'])})"
                 f"    # the inputs' normalization (cnnc.normalize in the ONNX file)\n}}\n")
    return text, weights


def _key(b: _Binding, layers: list[Layer]) -> str:
    """The cnnc binding a binding's first layer came from."""
    first = layers[b.layers[0]]
    return _cnnc_binding(first.hint, first.op)


def _foreign_name(layer: Layer) -> str:
    """A binding's name from another framework's names: the layer's parameter prefix, else its node name."""
    for p in layer.params.values():
        if isinstance(p, Named) and as_text(p.name).endswith((".weight", ".bias")):
            return as_text(p.name).rsplit(".", 1)[0]
    parts = [s for s in re.split(r"/", layer.hint) if s]
    if len(parts) > 1:  # TorchScript: /scope/scope/OpType
        return parts[-2]
    hint = parts[0] if parts else layer.op
    return (hint[5:] if hint.startswith("node_") else hint).lower()  # the dynamo exporter: node_conv2d_1


@dataclass
class Named:
    """A parameter value with the name it had in the ONNX file (used to name the binding)."""

    name: str
    value: Any


def _live(layers: list[Layer], output: int) -> list[int]:
    keep, todo = set(), [output]
    while todo:
        i = todo.pop()
        if i >= 0 and i not in keep:
            keep.add(i)
            todo.extend(layers[i].inputs)
    return sorted(keep)


def _call(layer: Layer, table: str | None) -> str:
    args = dict(layer.args)
    if table is not None:
        args["connect"] = table
    positional = [args.pop(k) for k in ("out", "k", "p") if k in args]
    keyword = [f"{k}={v}" for k, v in args.items()]
    inner = ", ".join(positional + keyword)
    return f"{layer.op}({inner})" if inner else layer.op


def _text(network: str, input_name: str, input_shape: tuple[int, ...], layers: list[Layer],
          bindings: list[_Binding], of: dict[int, _Binding], output: int,
          header: str) -> tuple[str, dict[str, Any]]:
    weights: dict[str, Any] = {}
    tables: dict[str, list[list[int]]] = {}
    lines = []
    for b in bindings:
        with_params = [i for i in b.layers if layers[i].params]
        parts = []
        for i in b.layers:
            layer = layers[i]
            table = None
            if layer.table is not None:
                table = identifier(layer.table[0])
                tables[table] = layer.table[1]
            parts.append(_call(layer, table))
            if layer.params:
                lname = b.name if len(with_params) == 1 else f"{b.name}.{with_params.index(i) + 1}"
                for kind, value in layer.params.items():
                    weights[f"{lname}.{kind}"] = value.value if isinstance(value, Named) else value
        first = layers[b.layers[0]]
        source = lambda j: input_name if j < 0 else of[j].name
        if OPS[first.op].multi_input:
            head = f"{first.op}({', '.join(source(j) for j in first.inputs)})"
            chain = [head, *parts[1:]]
        else:
            chain = [source(first.inputs[0]), *parts]
        lines.append(f"    {b.name} = {' -> '.join(chain)}")
    if bindings[-1] is not of[output]:
        lines.append(f"    output {of[output].name}")
    shape = "x".join(str(d) for d in input_shape)
    text = [*(f"# {h}" for h in header.splitlines()), f"network {identifier(network)} {{",
            f"    input {input_name}: {shape}", "", *lines, "}"]
    for name, rows in tables.items():
        text += ["", f"table {name} {{", *(f"    {o}: {' '.join(map(str, r))}" for o, r in enumerate(rows)), "}"]
    return "\n".join(text) + "\n", weights
