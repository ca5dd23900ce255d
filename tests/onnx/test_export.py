"""Export: every op has an ONNX spelling, every example passes ONNX's checker and runs in onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnc.ops import OPS
from cnnc_runtime.onnx_export import EXPORT, export_model
from tests.onnx.ortsession import run
from tests.reference import EXAMPLES, NETWORKS, build

onnx = pytest.importorskip("onnx")

EXAMPLE_TEXTS = {path.stem: path.read_text() for path in sorted(EXAMPLES.glob("*.cnn"))}
ALL = {**{f"example:{k}": v for k, v in EXAMPLE_TEXTS.items()}, **NETWORKS}
# the examples run in the quick suite; the other reference networks (more ops and shapes) with -m slow
CASES = [pytest.param(name, marks=() if name.startswith("example:") else pytest.mark.slow) for name in sorted(ALL)]


def network(model, x: np.ndarray) -> np.ndarray:
    """What the exported graph computes: the network on its input (no input rule: normalize is metadata)."""
    return model.infer_into(x, np.empty((len(x), *model.output_shape), dtype=np.float32))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def exported(text: str, tmp_path, seed: int = 1):
    model = build(text, seed=seed)
    path = tmp_path / f"{model.name}.onnx"
    export_model(model, path)
    return model, path, onnx.load(path)


def test_every_op_has_an_onnx_spelling():
    assert set(EXPORT) == set(OPS)


@pytest.mark.parametrize("name", CASES)
def test_export_passes_the_checker_and_onnxruntime_agrees(name, tmp_path):
    model, path, proto = exported(ALL[name], tmp_path)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    x = np.random.default_rng(0).standard_normal((3, *model.input_shape), dtype=np.float32)
    assert relative_error(run(path, x), network(model, x)) < 1e-4


def test_layer_and_parameter_names_are_kept(tmp_path):
    model, _, proto = exported(EXAMPLE_TEXTS["lenet5"], tmp_path)
    layers = [layer["name"] for layer in model.manifest["graph"] if layer["op"] != "input"]
    assert [n.name for n in proto.graph.node] == layers
    assert {t.name for t in proto.graph.initializer} == set(model.params)
    assert proto.opset_import[0].version == 17 and proto.ir_version == 8
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_connection_table_is_a_dense_conv_with_exact_zeros_and_kept_in_metadata(tmp_path):
    model, _, proto = exported(EXAMPLE_TEXTS["lenet5"], tmp_path)
    w = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "c3.weight"))
    rows = model.manifest["graph"][4]["args"]["connect"]
    mask = np.zeros((16, 6), dtype=bool)
    for o, row in enumerate(rows):
        mask[o, row] = True
    assert np.all(w[~mask] == 0.0) and np.all(w[mask] != 0.0)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["cnnc.connect"]) == {"c3": {"table": "lenet_c3", "rows": rows}}
    assert json.loads(meta["cnnc.normalize"]) == {"mean": 0.1307, "std": 0.3081}  # (the train section's)


def test_trained_weights_are_what_is_exported(tmp_path):
    model = build(EXAMPLE_TEXTS["lenet_modern"], seed=3)
    model.params["c1.bias"] = np.arange(6, dtype=np.float32)
    path = tmp_path / "m.onnx"
    model.export_onnx(path)
    bias = next(t for t in onnx.load(path).graph.initializer if t.name == "c1.bias")
    assert np.array_equal(onnx.numpy_helper.to_array(bias), np.arange(6, dtype=np.float32))
