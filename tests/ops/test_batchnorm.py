"""batchnorm in the language: arguments, shapes, counts (state apart from parameters) and the inference graph."""

from __future__ import annotations

import pytest

from cnnc.compiler import optimize
from cnnc.errors import CnnError
from cnnc.pipeline import check_source
from cnnc.summary import as_json, as_text

NET = """network n {
    input image: 3x8x8
    c = image -> conv(4, 3x3, bias=false) as conv1 -> batchnorm as bn1 -> relu
    p = c -> maxpool(2x2) -> batchnorm as bn2
    out = p -> flatten -> dense(5) as fc -> batchnorm as bn3
}
"""


def test_state_is_counted_apart_from_the_parameters():
    g = check_source(NET)
    assert g.nodes["bn1"]["params"] == {"weight": (4,), "bias": (4,)}
    assert g.nodes["bn1"]["state"] == {"running_mean": (4,), "running_var": (4,)}
    summary = as_json(g)
    assert summary["total_params"] == 108 + 8 + 8 + (36 * 5 + 5) + 10  # as PyTorch's parameters(): no buffers
    assert summary["state"] == 8 + 8 + 10
    assert [layer["macs"] for layer in summary["layers"] if layer["op"] == "batchnorm"] == [0, 0, 0]
    assert "state (not trained): 26" in as_text(g)


def test_the_inference_graph_folds_the_batchnorms_after_a_conv_or_dense():
    inf = optimize(check_source(NET)).graph["inference"]
    assert [n for n in inf.nodes if inf.nodes[n]["op"] == "batchnorm"] == ["bn2"]
    conv = inf.nodes["conv1"]
    assert conv["bn"] == "bn1" and conv["act"] == "relu" and conv["args"]["bias"] and not conv["own_bias"]
    assert conv["params"]["bias"] == (4,)
    assert inf.graph["output"] == "fc" and inf.nodes["fc"]["bn"] == "bn3"


@pytest.mark.parametrize("args,message", [
    ("momentum=1.5", "batchnorm: momentum must be in [0, 1], got 1.5"),
    ("eps=0", "batchnorm: eps must be > 0, got 0"),
])
def test_bad_arguments_are_errors(args, message):
    with pytest.raises(CnnError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_source(f"network n {{\n    input x: 4\n    y = x -> batchnorm({args})\n}}\n")
