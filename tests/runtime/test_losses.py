"""The loss table (``cnnc_runtime.losses``) is the one list of losses: the kernels, the float64 reference, the
parser and the artifacts all agree with it."""

from __future__ import annotations

import numpy as np
import pytest

from cnnc.codegen.loss import KERNELS
from cnnc.errors import CnnError
from cnnc.pipeline import check_source
from cnnc.reference import LOSS_REFERENCES, reference_loss
from cnnc_runtime.artifact import ENTRY_POINTS
from cnnc_runtime.losses import DEFAULT_LOSS, LOSSES
from tests.reference import build, random_params

NET = "network n { input x: 1x6x6\n h = x -> conv(3, 3x3) -> relu -> flatten -> dense(4)\n y = h -> softmax }"


def test_every_loss_has_a_kernel_a_reference_and_an_entry_point():
    assert set(KERNELS) == set(LOSS_REFERENCES) == set(LOSSES)
    assert {f"step_{name}" for name in LOSSES} <= set(ENTRY_POINTS)
    assert DEFAULT_LOSS in LOSSES
    assert all(name == loss.name for name, loss in LOSSES.items())


def test_the_scale_makes_the_mean_over_images_or_over_every_output():
    assert LOSSES["cross_entropy"].scale(8, 10) == 1 / 8
    assert LOSSES["mse"].scale(8, 10) == 1 / 80


def test_the_parser_takes_exactly_the_tables_names():
    for name in LOSSES:
        assert check_source(f"{NET}\ntrain {{ loss {name} }}").graph["train"]["loss"] == name
    with pytest.raises(CnnError, match="choose cross_entropy or mse"):
        check_source(f"{NET}\ntrain {{ loss hinge }}")


@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_native_loss_is_the_references_mean(loss):
    """The scale each loss applies (the runtime's) against the reference's mean, in float64; tolerance 1e-5."""
    model = build(NET)
    rng = np.random.default_rng(0)
    for name, value in random_params(check_source(NET), rng).items():
        model.params[name] = value
    x = rng.standard_normal((5, 1, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    native, _ = model.value_and_grad(x, y, loss)
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    assert native == pytest.approx(reference_loss(check_source(NET), params, x, y, loss), rel=1e-5)
