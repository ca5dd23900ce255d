"""`cnnc export` and `cnnc import`: an example out to ONNX and back, and what a file cnnc cannot take gets."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import cnnc
from tests.clitools import cnnc_cmd, one_line_error
from tests.reference import EXAMPLES

onnx = pytest.importorskip("onnx")


def test_export_then_import_gives_a_cnn_file_that_computes_the_same(tmp_path):
    model = cnnc.compile(EXAMPLES / "lenet5.cnn", seed=7)
    model.save(tmp_path / "w.npz")
    r = cnnc_cmd(tmp_path, "export", str(EXAMPLES / "lenet5.cnn"), "--weights", "w.npz", "-o", "lenet5.onnx")
    assert r.returncode == 0, r.stderr
    assert "wrote lenet5.onnx" in r.stdout
    r = cnnc_cmd(tmp_path, "import", "lenet5.onnx", "-o", "again.cnn")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "again.cnn").read_text()
    assert "c3 = s2 -> conv(16, 5, connect=lenet_c3) -> tanh" in text and "table lenet_c3 {" in text
    again = cnnc.compile(tmp_path / "again.cnn")
    again.load(tmp_path / "again.weights.npz")
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32), dtype=np.float32)
    assert np.array_equal(again(x), model(x))
    np.save(tmp_path / "x.npy", x)  # the other commands take the ONNX file as it is
    r = cnnc_cmd(tmp_path, "run", "lenet5.onnx", "--input", "x.npy", "-o", "y.npy")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), model(x))


def _resize_model(path):
    h = onnx.helper
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu_1"),
             h.make_node("Resize", ["r", "", "scales"], ["y"], name="Resize_12")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])], [scales])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), path)


def test_an_unsupported_node_is_one_error_line_naming_it(tmp_path):
    _resize_model(tmp_path / "up.onnx")
    r = cnnc_cmd(tmp_path, "import", "up.onnx", "-o", "up.cnn")
    assert one_line_error(r, 1) == "error: up.onnx: node 'Resize_12' (Resize): not supported by cnnc"
    assert not (tmp_path / "up.cnn").exists()


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x00\xffnot a protobuf" * 10)
    r = cnnc_cmd(tmp_path, "import", "x.onnx", "-o", "x.cnn")
    assert "not a valid ONNX model" in one_line_error(r, 1)


def test_without_the_onnx_extra_the_command_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # (import onnx then raises ImportError)
    r = cnnc_cmd(tmp_path, "export", str(EXAMPLES / "mlp.cnn"), "-o", "mlp.onnx")
    assert one_line_error(r, 1) == "error: this needs the 'onnx' package: pip install 'cnnc[onnx]'"
