"""export -> import -> export gives the same graph: ops, attributes, weights, and (without blocks) names."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc
from cnnc.onnx.import_ import import_file
from cnnc_runtime.onnx_export import export_model
from tests.onnx.test_export import ALL
from tests.reference import build

QUICK = {"example:lenet5", "example:resnet_tiny", "example:filters", "smooth"}  # tables, blocks, fixed weights, gelu
CASES = [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow) for name in sorted(ALL)]

onnx = pytest.importorskip("onnx")


def signature(proto, names: bool) -> list:
    """The graph as comparable data: each node's op, attributes and (when `names`) its names; the weights."""
    g = proto.graph
    rename = (lambda s: s) if names else (lambda s: "")
    nodes = [(n.op_type, rename(n.name), [rename(i) for i in n.input], sorted(
        (a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)) for n in g.node]
    weights = [(rename(t.name), onnx.numpy_helper.to_array(t).tolist()) for t in g.initializer]
    meta = {p.key: p.value for p in proto.metadata_props} if names else {}
    return [nodes, weights, meta]


def round_trip(path, out):
    imported = import_file(path)
    model = cnnc.compile_string(imported.text, "imported.cnn")
    model.load_arrays(imported.weights, str(path))
    export_model(model, out)
    return model, onnx.load(out)


@pytest.mark.parametrize("name", CASES)
def test_export_import_export_gives_the_same_graph(name, tmp_path):
    first = tmp_path / "first.onnx"
    original = build(ALL[name], seed=4)
    export_model(original, first)
    model, second = round_trip(first, tmp_path / "second.onnx")
    blocks = "block " in ALL[name]  # (names made inside blocks hold dots, which a .cnn name cannot)
    assert signature(second, names=not blocks) == signature(onnx.load(first), names=not blocks)
    _, third = round_trip(tmp_path / "second.onnx", tmp_path / "third.onnx")
    assert signature(third, names=True) == signature(second, names=True)
    x = np.random.default_rng(0).standard_normal((2, *original.input_shape), dtype=np.float32)
    assert np.array_equal(model(x), original(x))
