"""Import of small hand-written graphs: the arithmetic patterns it recognises, and the clear refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnc.errors import CnnError
from cnnc.onnx.import_ import import_file, import_model

onnx = pytest.importorskip("onnx")
h = onnx.helper


def model(nodes, consts=None, shape=(3, 8, 8), out_shape=None, inputs=None):
    """A model reading x: N x `shape`, writing y; `consts` are initializers (name -> array)."""
    consts = {k: np.asarray(v, dtype=np.float32) for k, v in (consts or {}).items()}
    ins = inputs or [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", *shape])]
    out = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", *(out_shape or shape)])
    g = h.make_graph([h.make_node(*n[:3], name=n[3], **(n[4] if len(n) > 4 else {})) for n in nodes], "g", ins,
                     [out], [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def chain(text: str) -> str:
    """The binding lines of an imported file."""
    return " ".join(line.strip() for line in text.splitlines() if " = " in line)


def test_silu_in_either_order_and_gelu_in_another_arrangement_are_recognised():
    silu = model([("Sigmoid", ["x"], ["s"], "sig"), ("Mul", ["s", "x"], ["y"], "mul")])
    assert chain(import_model(silu).text) == "mul = x -> silu"
    gelu = model([("Mul", ["x", "half"], ["a"], "m1"), ("Div", ["x", "r2"], ["b"], "d"), ("Erf", ["b"], ["e"], "e"),
                  ("Add", ["one", "e"], ["f"], "a1"), ("Mul", ["a", "f"], ["y"], "m2")],
                 {"half": 0.5, "r2": math.sqrt(2.0), "one": 1.0})
    assert chain(import_model(gelu).text) == "m2 = x -> gelu"


def test_arithmetic_that_is_no_activation_is_refused_by_node():
    square = model([("Mul", ["x", "x"], ["y"], "sq")])
    with pytest.raises(CnnError, match=r"node 'sq' \(Mul\): element-wise arithmetic that is no activation"):
        import_model(square)
    scale = model([("Mul", ["x", "w"], ["y"], "scale")], {"w": np.ones((1, 3, 1, 1))})
    with pytest.raises(CnnError, match=r"node 'scale' \(Mul\): element-wise arithmetic with a non-scalar constant"):
        import_model(scale)


def test_padding_that_is_neither_symmetric_nor_same_is_refused():
    w = np.ones((2, 3, 3, 3))
    conv = model([("Conv", ["x", "w"], ["y"], "c", {"pads": [0, 0, 2, 2]})], {"w": w}, out_shape=(2, 8, 8))
    with pytest.raises(CnnError, match=r"node 'c' \(Conv\): padding .* is neither symmetric nor 'same'"):
        import_model(conv)
    same = model([("Conv", ["x", "w"], ["y"], "c", {"auto_pad": "SAME_UPPER", "strides": [2, 2]})], {"w": w},
                 out_shape=(2, 4, 4))
    assert "conv(2, 3, stride=2, pad=same, bias=false)" in import_model(same).text


def test_a_second_data_input_and_a_reshape_that_is_no_flatten_are_refused():
    two = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 4]) for n in ("x", "z")]
    with pytest.raises(CnnError, match="the graph has 2 inputs"):
        import_model(model([("Add", ["x", "z"], ["y"], "a")], shape=(4,), inputs=two))
    reshape = model([("Reshape", ["x", "s"], ["y"], "r")], {"s": np.array([0, 3, 64])}, out_shape=(3, 64))
    reshape.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([0, 3, 64], np.int64), "s"))
    with pytest.raises(CnnError, match=r"node 'r' \(Reshape\): a reshape to \[0, 3, 64\]"):
        import_model(reshape)


def test_batch_norm_becomes_a_batchnorm_layer_with_its_statistics():
    rng = np.random.default_rng(0)
    w, scale, bias = rng.standard_normal((2, 3, 1, 1)), np.array([2.0, 0.5]), np.array([0.1, -0.2])
    mean, var = np.array([0.3, -0.1]), np.array([4.0, 0.25])
    bn = model([("Conv", ["x", "w"], ["c"], "conv"),
                ("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"], "bn",
                 {"epsilon": 1e-3, "momentum": 0.8})],
               {"w": w, "scale": scale, "bias": bias, "mean": mean, "var": var}, out_shape=(2, 8, 8))
    imported = import_model(bn)
    assert chain(imported.text) == ("conv_ = x -> conv(2, 1, bias=false) "
                                    "bn = conv_ -> batchnorm(eps=0.001, momentum=0.2)")
    assert np.array_equal(imported.weights["bn.running_var"], var.astype(np.float32))
    assert np.array_equal(imported.weights["bn.weight"], scale.astype(np.float32))
def test_damaged_files_are_refused_with_a_clear_error_never_a_traceback(tmp_path):
    """Bytes of a real export flipped at random: each file either imports or raises CnnError."""
    w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    good = model([("Conv", ["x", "w"], ["c"], "conv", {"pads": [1, 1, 1, 1]}), ("Relu", ["c"], ["r"], "relu"),
                  ("MaxPool", ["r"], ["p"], "pool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
                  ("Flatten", ["p"], ["y"], "flat")], {"w": w}, out_shape=(64,)).SerializeToString()
    rng = np.random.default_rng(2)
    for i in range(60):
        data = bytearray(good)
        for at in rng.integers(0, len(data), int(rng.integers(1, 4))):
            data[at] = int(rng.integers(0, 256))
        path = tmp_path / f"damaged{i}.onnx"
        path.write_bytes(bytes(data))
        try:
            import_file(path)
        except CnnError:
            pass
