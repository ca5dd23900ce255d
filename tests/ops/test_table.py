"""The op table is complete: every op has every part, and the other tables agree with it on their keys."""

from __future__ import annotations

import re

import numpy as np
import pytest

from cnnc.codegen.lowering import BACKWARD, FAMILIES, FORWARD
from cnnc.ops import ACTIVATIONS, LAYERS, OPS
from cnnc.ops.activations import he_init, saves_input
from tests.reference import NETWORKS


def test_every_op_has_a_kernel_family_and_both_rules():
    assert set(FORWARD) == set(OPS) == set(BACKWARD)
    for name, op in OPS.items():
        assert op.lowering in FAMILIES, name


@pytest.mark.parametrize("name", LAYERS)
def test_every_layer_has_a_reference_and_a_gradient_rule(name):
    op = OPS[name]
    assert callable(op.reference) and callable(op.reference_grad), name
    assert op.doc, name


def test_the_activation_table_is_the_ops_that_fuse():
    assert {n for n, op in OPS.items() if op.activation} == set(ACTIVATIONS)
    for name, act in ACTIVATIONS.items():
        op = OPS[name]
        assert op.act is act and op.lowering == "activation" and op.args == act.args
        assert act.grad_from in ("output", "input")
        assert all(callable(f) for f in (act.reference, act.derivative, act.kernel, act.kernel_grad))


def test_defaults_are_written_once_in_the_table():
    assert OPS["leaky_relu"].arg("alpha").default == 0.01
    assert OPS["elu"].arg("alpha").default == 1.0


def test_initialisation_and_saved_tensors_come_from_the_table():
    assert [a for a in ACTIVATIONS if he_init(a)] == ["relu", "leaky_relu", "elu", "gelu", "silu"]
    assert not he_init("none") and not he_init("softmax")
    assert [a for a in ACTIVATIONS if saves_input(a)] == ["gelu", "silu"]


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_every_activation_runs_in_a_whole_test_network(name):
    """The whole-network tests (native vs reference, gradients, PyTorch) see every activation."""
    assert any(re.search(rf"-> *{name}\b", text) for text in NETWORKS.values()), name


def test_every_activation_has_a_torch_oracle():
    pytest.importorskip("torch")
    from tests.reference import _torch_activations

    assert set(_torch_activations()) == set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_reference_derivative_matches_central_differences(name):
    act, args = ACTIVATIONS[name], {a.name: a.default for a in ACTIVATIONS[name].args}
    x = np.concatenate([np.linspace(-6, -0.05, 40), np.linspace(0.05, 6, 40)])
    eps = 1e-6
    numeric = (act.reference(x + eps, args) - act.reference(x - eps, args)) / (2 * eps)
    np.testing.assert_allclose(act.derivative(x, act.reference(x, args), args), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("act", ["elu", "leaky_relu"])
def test_an_activation_checks_its_arguments(act):
    """A negative alpha would need the input for the gradient (it is computed from the output): refused."""
    from cnnc.errors import CnnError
    from cnnc.pipeline import check_source

    with pytest.raises(CnnError, match=f"error: {act}: alpha must be >= 0"):
        check_source(f"network n {{\n    input x: 4\n    y = x -> dense(3) -> {act}(alpha=-1.0)\n}}\n")


def test_the_max_pool_reference_routes_a_nan_windows_gradient_to_its_last_nan():
    """As the kernels and PyTorch do (np.argmax alone would pick the first NaN)."""
    from cnnc.ops.pool import max_reference_grad
    from cnnc.pipeline import check_source

    node = check_source("network n { input x: 1x2x4 y = x -> maxpool(2x2) }", "t.cnn").nodes["y"]
    x = np.array([[[[np.nan, 1.0, 2.0, 7.0], [3.0, np.nan, 7.0, 5.0]]]])
    (dx,), _ = max_reference_grad(node, [x], None, np.array([[[[10.0, 20.0]]]]), {})
    np.testing.assert_array_equal(dx, [[[[0, 0, 0, 20.0], [0, 10.0, 0, 0]]]])  # ties: the first maximum
