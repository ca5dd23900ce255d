"""Fusion: conv or dense + activation become one node when the activation is the only consumer."""

from __future__ import annotations

from pathlib import Path

from cnnc import cli
from cnnc.errors import Diagnostics
from cnnc.ops import ACTIVATIONS
from cnnc.pipeline import check_source, optimize

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def fused(source: str):
    """(checked graph, fused graph)."""
    diag = Diagnostics()
    g = check_source(source, "t.cnn", diag)
    assert diag.render() == []
    return g, optimize(g)


def net(body: str, input_shape: str = "2x8x8") -> str:
    return f"network n {{\n    input x: {input_shape}\n{body}\n}}\n"


def test_conv_relu_fuses():
    g, f = fused(net("    c = x -> conv(4, 3) -> relu -> maxpool(2)"))
    assert "c.relu" not in f
    node = f.nodes["c"]
    assert (node["op"], node["act"], node["fused"]) == ("conv", "relu", ["c.relu"])
    assert f.nodes["c.maxpool"]["inputs"] == ["c"]
    assert list(f.predecessors("c.maxpool")) == ["c"]
    assert node["shape"] == g.nodes["c.relu"]["shape"] == (4, 6, 6)  # the fused node keeps the shape
    assert node["params"] == g.nodes["c"]["params"]


def test_dense_tanh_fuses():
    g, f = fused(net("    h = x -> dense(8) -> tanh -> dense(2)", "5"))
    assert (f.nodes["h.1"]["act"], f.nodes["h.1"]["fused"]) == ("tanh", ["h.tanh"])
    assert f.nodes["h.2"]["inputs"] == ["h.1"]
    assert f.nodes["h.1"]["shape"] == (8,)
    assert f.nodes["h.2"].get("act", "none") == "none"


def test_every_activation_fuses_and_carries_all_its_arguments():
    for act in ACTIVATIONS:
        _, f = fused(net(f"    h = x -> dense(8) -> {act} -> dense(2)", "5"))
        assert f.nodes["h.1"]["act"] == act
        assert f.nodes["h.1"]["act_args"] == {a.name: a.default for a in ACTIVATIONS[act].args}
    _, f = fused(net("    h = x -> dense(8) -> leaky_relu(alpha=0.2) -> dense(2)", "5"))
    assert f.nodes["h.1"]["act_args"] == {"alpha": 0.2}
    _, f = fused(net("    h = x -> dense(8) -> elu(alpha=0.5) -> dense(2)", "5"))
    assert f.nodes["h.1"]["act_args"] == {"alpha": 0.5}


def test_conv_whose_output_is_also_used_by_add_does_not_fuse():
    g, f = fused(net("    c = x -> conv(2, 3, pad=1)\n    r = c -> relu\n    s = add(c, r)"))
    assert f.nodes["c"].get("act", "none") == "none"
    assert "r" in f
    assert f.nodes["s"]["inputs"] == ["c", "r"]


def test_residual_second_conv_does_not_fuse_but_first_does():
    _, f = fused((EXAMPLES / "resnet_tiny.cnn").read_text())
    assert f.nodes["stage1.1.y.1"]["act"] == "relu"
    assert f.nodes["stage1.1.y.2"].get("act", "none") == "none"  # feeds add, not an activation
    assert "stage1.1.out.relu" in f  # after add: nothing to fuse into


def test_inference_graph_lets_a_blocks_last_conv_do_the_residual_add_and_its_relu():
    g, f = fused((EXAMPLES / "resnet_tiny.cnn").read_text())
    inf = f.graph["inference"]
    for gone in ("stage1.1.out.add", "stage1.1.out.relu"):
        assert gone not in inf and gone in f  # training keeps them apart
    node = inf.nodes["stage1.1.y.2"]
    assert node["inputs"] == ["stage1.1.y.1", "stem"] and node["residual"] == "stem"
    assert (node["act"], node["fused"]) == ("relu", ["stage1.1.out.add", "stage1.1.out.relu"])
    assert inf.edges["stem", "stage1.1.y.2"]["ports"] == [1]
    assert list(inf.successors("stage1.1.y.2")) == ["stage1.2.y.1", "stage1.2.y.2"]
    unfused = optimize(g, skip=("fuse",)).graph["inference"]
    assert unfused.nodes["stage1.1.out.add"].get("act", "none") == "none" and "stage1.1.out.relu" in unfused
    assert unfused.nodes["stage1.1.y.2"].get("residual") is None


def test_an_add_whose_conv_is_read_elsewhere_stays_an_add():
    _, f = fused(net("    a = x -> conv(2, 3, pad=1)\n    b = a -> relu\n    s = add(a, x) -> relu\n"
                     "    y = concat(b, s)"))
    inf = f.graph["inference"]
    assert inf.nodes["s.add"]["act"] == "relu" and inf.nodes["a"].get("residual") is None


def test_a_conv_on_the_blocks_input_takes_the_input_as_its_residual_too():
    _, f = fused(net("    c = x -> conv(2, 3, pad=1)\n    y = add(c, x) -> relu"))
    inf = f.graph["inference"]
    (conv,) = [n for n in inf if inf.nodes[n]["op"] == "conv"]
    assert inf.nodes[conv]["inputs"] == ["x", "x"] and inf.edges["x", conv]["ports"] == [0, 1]
    assert inf.graph["output"] == conv and inf.nodes[conv]["act"] == "relu"


def test_an_add_of_three_tensors_keeps_its_activation_apart():
    _, f = fused(net("    a = x -> conv(2, 3, pad=1)\n    b = x -> conv(2, 1)\n    s = add(a, b, x) -> relu"))
    inf = f.graph["inference"]
    assert inf.nodes["s.add"].get("act", "none") == "none" and "s.relu" in inf


def test_network_output_conv_is_not_fused_into_nothing():
    _, f = fused(net("    y = x -> flatten -> dense(3)"))
    assert f.graph["output"] == "y"
    assert f.nodes["y"].get("act", "none") == "none"


def test_activation_that_is_the_output_fuses_and_moves_the_output():
    g, f = fused(net("    y = x -> flatten -> dense(3) -> sigmoid"))
    assert g.graph["output"] == "y.sigmoid"
    assert f.graph["output"] == "y"
    assert f.nodes["y"]["act"] == "sigmoid"


def test_pool_and_softmax_do_not_fuse():
    _, f = fused(net("    y = x -> maxpool(2) -> relu -> flatten -> dense(3) -> softmax"))
    assert "y.relu" in f and "y.softmax" in f
    assert f.nodes["y"].get("act", "none") == "none"


def test_two_activations_fuse_only_the_first():
    _, f = fused(net("    y = x -> flatten -> dense(3) -> relu -> tanh"))
    assert f.nodes["y"]["act"] == "relu"
    assert f.nodes["y.tanh"]["inputs"] == ["y"]


def test_checked_graph_is_unchanged():
    g, f = fused(net("    c = x -> conv(4, 3) -> relu"))
    assert "c.relu" in g and "act" not in g.nodes["c"]
    assert g is not f


def test_check_text_marks_fused_groups(capsys):
    assert cli.main(["check", str(EXAMPLES / "lenet5.cnn")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines if line and line.split()[0] in ("c1", "c1.tanh", "s2", "logits")}
    assert row["c1"].endswith("fused ┐")
    assert row["c1.tanh"].endswith("┘")
    assert "fused" not in row["s2"] and "┘" not in row["s2"]
    assert "fused" not in row["logits"]
    assert sum(line.endswith("fused ┐") for line in lines) == 4  # c1, c3, c5, f6


def test_check_text_marks_fused_groups_of_an_mlp(capsys):
    assert cli.main(["check", str(EXAMPLES / "mlp.cnn")]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    marks = [(line.split()[0], line.split()[-1]) for line in out.splitlines() if line.endswith(("┐", "┘"))]
    assert marks == [("h1", "┐"), ("h1.relu", "┘"), ("h2", "┐"), ("h2.relu", "┘")]


def test_graph_fused_shows_the_activation(tmp_path):
    out = tmp_path / "f.dot"
    assert cli.main(["graph", "--fused", str(EXAMPLES / "lenet5.cnn"), "-o", str(out)]) == 0
    dot = out.read_text()
    assert "conv+tanh" in dot and "dense+tanh" in dot
    assert "c1.tanh" not in dot


def test_input_reading_activations_fuse_and_keep_their_input_for_training():
    """gelu and silu fuse into conv and dense like the others; training keeps their input (Plan.pre), elu not."""
    from cnnc.codegen.plan import plan_memory
    from tests.reference import SMOOTH

    _, f = fused(SMOOTH)
    acts = {n: f.nodes[n]["act"] for n in f.nodes if f.nodes[n].get("act", "none") != "none"}
    assert acts == {"a": "gelu", "b": "silu", "g": "silu", "f.1": "gelu", "f.2": "elu"}
    assert set(plan_memory(f, training=True).pre) == {"a", "b", "g", "f.1"}
    assert plan_memory(f, training=False).pre == {}
