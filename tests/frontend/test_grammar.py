"""Every construct of the language parses and lowers, and layers get the names LANGUAGE.md promises.

Naming (normative): a labelled layer takes its label; a binding with exactly
one layer with parameters gives it the binding's name; several are
``BINDING.1``, ``BINDING.2`` ... in chain order; inside a block, names are
prefixed with the binding that uses the block. Parameters are
``NAME.weight`` and ``NAME.bias``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from cnnc.errors import Diagnostics
from cnnc.pipeline import check_source
from cnnc.summary import as_json, layer_order

parse = importlib.import_module("cnnc.frontend.parse").parse
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def check(source: str):
    diag = Diagnostics()
    g = check_source(source, "t.cnn", diag)
    assert diag.render() == []
    return g


def layers(g) -> list[tuple[str, str]]:
    """(name, op) of every layer in execution order."""
    return [(n, g.nodes[n]["op"]) for n in layer_order(g)]


def param_names(g) -> list[str]:
    """NAME.weight / NAME.bias of every parameter, in execution order."""
    return [f"{n}.{p}" for n in layer_order(g) for p in g.nodes[n]["params"]]


def shape(g, name: str) -> tuple:
    return g.nodes[name]["shape"]


# ---- networks and inputs --------------------------------------------------

def test_image_input():
    g = check("network n {\n    input image: 3x32x24\n    y = image -> relu\n}\n")
    assert g.graph["network"] == "n"
    assert g.graph["input"] == "image"
    assert g.nodes["image"]["op"] == "input"
    assert shape(g, "image") == (3, 32, 24)
    assert as_json(g)["input"] == {"name": "image", "shape": [3, 32, 24]}


def test_vector_input():
    g = check("network mlp {\n    input v: 784\n    y = v -> dense(10)\n}\n")
    assert shape(g, "v") == (784,)
    assert shape(g, "y") == (10,)


def test_whole_file_of_the_reference_parses():
    """The normative example of LANGUAGE.md is examples/lenet5.cnn."""
    g = check((EXAMPLES / "lenet5.cnn").read_text())
    assert layers(g) == [
        ("c1", "conv"), ("c1.tanh", "tanh"), ("s2", "avgpool"), ("c3", "conv"), ("c3.tanh", "tanh"),
        ("s4", "avgpool"), ("c5", "conv"), ("c5.tanh", "tanh"), ("f6.flatten", "flatten"), ("f6", "dense"),
        ("f6.tanh", "tanh"), ("logits", "dense"),
    ]
    assert param_names(g) == [
        "c1.weight", "c1.bias", "c3.weight", "c3.bias", "c5.weight", "c5.bias",
        "f6.weight", "f6.bias", "logits.weight", "logits.bias",
    ]
    assert g.nodes["c3"]["params"] == {"weight": (16, 6, 5, 5), "bias": (16,)}
    assert g.graph["train"] == {"data": "data/mnist", "normalize": {"mean": 0.1307, "std": 0.3081},
                                "loss": "cross_entropy", "optimizer": {"name": "adam", "lr": 0.001},
                                "lr_decay": 0.85, "jitter": 0.1, "batch": 64, "epochs": 20}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.cnn")), ids=lambda p: p.name)
def test_examples_parse_and_check_without_warnings(path):
    diag = Diagnostics()
    g = check_source(path.read_text(), str(path), diag)
    assert diag.render() == []
    assert g.graph["output"] == layer_order(g)[-1]


def test_items_in_any_order():
    """Tables, blocks, the train section and the network may come in any order."""
    g = check("train {\n    batch 8\n}\n"
              "network n {\n    input x: 3x8x8\n    y = x -> b(4) -> conv(2, 3, connect=t)\n}\n"
              "table t {\n    0: 0 1\n    1: 2 3\n}\n"
              "block b(c) {\n    input x\n    y = x -> conv(c, 1)\n}\n")
    assert [n for n, _ in layers(g)] == ["y.1.y", "y.2"]
    assert g.graph["train"] == {"batch": 8}


# ---- bindings, chains, labels, output -------------------------------------

def test_chain_over_several_lines_with_comments():
    g = check("""# a comment before everything
network n {  # after the brace
    input x: 1x8x8    # the input
    y = x             # a chain
        -> conv(2, 3x3)
        # a comment between links
        -> relu
        ->
        maxpool(2)
}
""")
    assert layers(g) == [("y", "conv"), ("y.relu", "relu"), ("y.maxpool", "maxpool")]
    assert shape(g, "y.maxpool") == (2, 3, 3)


def test_statements_on_one_line():
    g = check("network n { input x: 4 a = x -> dense(3) b = a -> relu }")
    assert layers(g) == [("a", "dense"), ("b", "relu")]


def test_single_layer_with_params_takes_the_binding_name():
    g = check("network n {\n    input x: 1x8x8\n    c1 = x -> conv(6, 3x3) -> tanh -> maxpool(2)\n}\n")
    assert layers(g) == [("c1", "conv"), ("c1.tanh", "tanh"), ("c1.maxpool", "maxpool")]
    assert param_names(g) == ["c1.weight", "c1.bias"]


def test_single_layer_without_params_takes_the_binding_name():
    g = check("network n {\n    input x: 1x8x8\n    s2 = x -> avgpool(2x2)\n    f = s2 -> flatten -> relu\n}\n")
    assert layers(g) == [("s2", "avgpool"), ("f.flatten", "flatten"), ("f.relu", "relu")]


def test_several_layers_with_params_are_numbered_in_chain_order():
    g = check("network n {\n    input x: 1x8x8\n"
              "    f = x -> conv(4, 3) -> relu -> flatten -> dense(10) -> relu -> dense(5, bias=false)\n}\n")
    assert layers(g) == [("f.1", "conv"), ("f.relu", "relu"), ("f.flatten", "flatten"), ("f.2", "dense"),
                         ("f.relu2", "relu"), ("f.3", "dense")]
    assert param_names(g) == ["f.1.weight", "f.1.bias", "f.2.weight", "f.2.bias", "f.3.weight"]
    assert g.nodes["f.2"]["params"] == {"weight": (10, 144), "bias": (10,)}
    assert g.nodes["f.3"]["params"] == {"weight": (5, 10)}


def test_as_labels():
    g = check("network n {\n    input x: 1x8x8\n"
              "    f = x -> conv(6, 5x5) as c1 -> tanh as act -> flatten -> dense(10) as out\n}\n")
    assert layers(g) == [("c1", "conv"), ("act", "tanh"), ("f.flatten", "flatten"), ("out", "dense")]
    assert param_names(g) == ["c1.weight", "c1.bias", "out.weight", "out.bias"]


def test_label_keeps_the_numbering_of_the_others():
    g = check("network n {\n    input x: 4\n    f = x -> dense(8) -> dense(6) as mid -> dense(2)\n}\n")
    assert [n for n, _ in layers(g)] == ["f.1", "mid", "f.3"]


def test_output_statement():
    g = check("network n {\n    input x: 4\n    h = x -> dense(8) -> relu\n    logits = h -> dense(3)\n"
              "    output h\n}\n".replace("    output h", "    output logits"))
    assert g.graph["output"] == "logits"
    g = check_source("network n {\n    input x: 4\n    h = x -> dense(8) -> relu\n    output h\n"
                     "    logits = h -> dense(3)\n}\n", "t.cnn", Diagnostics())
    assert g.graph["output"] == "h.relu"
    assert "logits" not in g  # the unused binding is pruned
    assert layer_order(g)[-1] == "h.relu"


def test_output_defaults_to_the_last_binding():
    g = check("network n {\n    input x: 4\n    a = x -> dense(3)\n    b = x -> dense(3)\n    c = add(a, b)\n}\n")
    assert g.graph["output"] == "c"


def test_add_and_concat_start_a_chain():
    g = check("network n {\n    input x: 2x8x8\n    a = x -> conv(2, 3, pad=1)\n    b = x -> conv(3, 3, pad=1)\n"
              "    s = add(x, a) -> relu\n    c = concat(s, b, x) -> conv(4, 1)\n}\n")
    assert layers(g) == [("a", "conv"), ("b", "conv"), ("s.add", "add"), ("s.relu", "relu"),
                         ("c.concat", "concat"), ("c", "conv")]
    assert g.nodes["s.add"]["inputs"] == ["x", "a"]
    assert g.nodes["c.concat"]["inputs"] == ["s.relu", "b", "x"]
    assert shape(g, "c.concat") == (7, 8, 8)


def test_add_alone_takes_the_binding_name():
    g = check("network n {\n    input x: 4\n    a = x -> relu\n    s = add(x, a)\n}\n")
    assert layers(g) == [("a", "relu"), ("s", "add")]


# ---- tables ---------------------------------------------------------------

def test_table_is_resolved_into_rows():
    g = check("network n {\n    input x: 3x8x8\n    y = x -> conv(3, 3, connect=pairs)\n}\n"
              "table pairs {\n    2: 2 0\n    0: 0 1\n    1:1 2\n}\n")
    args = g.nodes["y"]["args"]
    assert args["connect"] == ((0, 1), (1, 2), (0, 2))
    assert args["connect_name"] == "pairs"
    assert g.nodes["y"]["params"] == {"weight": (3, 3, 3, 3), "bias": (3,)}  # full shape kept
    assert g.nodes["y"]["param_count"] == 6 * 9 + 3


def test_table_rows_on_one_line():
    g = check("network n { input x: 2x4x4 y = x -> conv(2, 1, connect=t) }\ntable t { 0: 0 1: 1 }")
    assert g.nodes["y"]["args"]["connect"] == ((0,), (1,))


# ---- blocks ---------------------------------------------------------------

BLOCKS = """
block unit(c, k = 3, act_alpha = 0.1) {
    input x
    y = x -> conv(c, k, pad=same) -> leaky_relu(alpha=act_alpha)
}

block wide(c) {
    input x
    a = x -> conv(2 * c, 3x3, pad=1) -> relu
    b = a -> conv(c + 1, 1) -> conv(c - 1, 1) -> conv(c * 2 / 2, 1)
}

network n {
    input image: 2x16x16
    p = image -> unit(4)
    q = p -> unit(6, k=5, act_alpha=0.2)
    r = q -> unit(c=2, k=1x3)
    w = r -> wide(4)
}
"""


def test_block_names_are_prefixed_with_the_using_binding():
    g = check(BLOCKS)
    assert layers(g) == [
        ("p.y", "conv"), ("p.y.leaky_relu", "leaky_relu"),
        ("q.y", "conv"), ("q.y.leaky_relu", "leaky_relu"),
        ("r.y", "conv"), ("r.y.leaky_relu", "leaky_relu"),
        ("w.a", "conv"), ("w.a.relu", "relu"), ("w.b.1", "conv"), ("w.b.2", "conv"), ("w.b.3", "conv"),
    ]
    assert param_names(g)[:2] == ["p.y.weight", "p.y.bias"]


def test_block_parameters_defaults_and_keywords():
    g = check(BLOCKS)
    assert g.nodes["p.y"]["params"]["weight"] == (4, 2, 3, 3)
    assert g.nodes["p.y.leaky_relu"]["args"]["alpha"] == 0.1
    assert g.nodes["q.y"]["params"]["weight"] == (6, 4, 5, 5)
    assert g.nodes["q.y.leaky_relu"]["args"]["alpha"] == 0.2
    assert g.nodes["r.y"]["params"]["weight"] == (2, 6, 1, 3)
    assert shape(g, "r.y") == (2, 16, 16)


def test_block_parameters_in_arithmetic():
    g = check(BLOCKS)
    assert g.nodes["w.a"]["params"]["weight"] == (8, 2, 3, 3)  # 2 * c
    assert g.nodes["w.b.1"]["params"]["weight"] == (5, 8, 1, 1)  # c + 1
    assert g.nodes["w.b.2"]["params"]["weight"] == (3, 5, 1, 1)  # c - 1
    assert g.nodes["w.b.3"]["params"]["weight"] == (4, 3, 1, 1)  # c * 2 / 2
    assert shape(g, "w.b.3") == (4, 16, 16)


def test_arithmetic_precedence():
    g = check("block b(c) {\n    input x\n    y = x -> dense(1 + c * 3 - 8 / 4)\n}\n"
              "network n {\n    input x: 4\n    y = x -> b(5)\n}\n")
    assert shape(g, "y.y") == (14,)


def test_block_used_twice_and_with_output_and_label():
    g = check("""
block res(c) {
    input x
    y = x -> conv(c, 3, pad=1) as first -> relu -> conv(c, 3, pad=1)
    out = add(x, y) -> relu
    output out
}
network n {
    input image: 4x8x8
    a = image -> res(4) -> res(4)
    b = a -> res(4)
}
""")
    names = [n for n, _ in layers(g)]
    assert names == [
        "a.1.first", "a.1.y.relu", "a.1.y.2", "a.1.out.add", "a.1.out.relu",
        "a.2.first", "a.2.y.relu", "a.2.y.2", "a.2.out.add", "a.2.out.relu",
        "b.first", "b.y.relu", "b.y.2", "b.out.add", "b.out.relu",
    ]
    assert g.nodes["a.2.out.add"]["inputs"] == ["a.1.out.relu", "a.2.y.2"]


def test_block_inside_a_block():
    g = check("block inner(c) {\n    input x\n    y = x -> dense(c)\n}\n"
              "block outer(c) {\n    input x\n    h = x -> inner(c) -> inner(2 * c)\n}\n"
              "network n {\n    input v: 8\n    z = v -> outer(3)\n}\n")
    assert [n for n, _ in layers(g)] == ["z.h.1.y", "z.h.2.y"]
    assert shape(g, "z.h.2.y") == (6,)


def test_block_without_parameters_in_chain_as_a_word():
    g = check("block act() {\n    input x\n    y = x -> relu\n}\n"
              "network n {\n    input v: 8\n    z = v -> dense(4) -> act\n}\n")
    assert layers(g) == [("z", "dense"), ("z.act.y", "relu")]


# ---- repetition -------------------------------------------------------------

def test_repeat_a_layer():
    g = check("network n {\n    input x: 4\n    y = x -> dense(8) * 3 -> relu * 2\n}\n")
    assert layers(g) == [("y.1", "dense"), ("y.2", "dense"), ("y.3", "dense"), ("y.relu", "relu"),
                         ("y.relu2", "relu")]
    assert g.nodes["y.1"]["params"]["weight"] == (8, 4)
    assert g.nodes["y.2"]["params"]["weight"] == (8, 8)


def test_repeat_a_block():
    g = check("block residual(c) {\n    input x\n"
              "    y = x -> conv(c, 3x3, pad=same) -> relu -> conv(c, 3x3, pad=same)\n"
              "    out = add(x, y) -> relu\n}\n"
              "network n {\n    input image: 16x8x8\n    r = image -> residual(16) * 2\n}\n")
    assert [n for n, _ in layers(g)] == [
        "r.1.y.1", "r.1.y.relu", "r.1.y.2", "r.1.out.add", "r.1.out.relu",
        "r.2.y.1", "r.2.y.relu", "r.2.y.2", "r.2.out.add", "r.2.out.relu",
    ]
    assert param_names(g) == ["r.1.y.1.weight", "r.1.y.1.bias", "r.1.y.2.weight", "r.1.y.2.bias",
                              "r.2.y.1.weight", "r.2.y.1.bias", "r.2.y.2.weight", "r.2.y.2.bias"]


def test_repeat_a_parenthesised_group():
    g = check("network n {\n    input x: 1x8x8\n    y = x -> (conv(4, 3, pad=1) -> relu) * 2 -> (maxpool(2)) * 1\n}\n")
    assert layers(g) == [("y.1", "conv"), ("y.relu", "relu"), ("y.2", "conv"), ("y.relu2", "relu"),
                         ("y.maxpool", "maxpool")]
    assert g.nodes["y.2"]["params"]["weight"] == (4, 4, 3, 3)


def test_nested_groups_multiply():
    g = check("network n {\n    input x: 4\n    y = x -> ((dense(4) -> relu) * 2 -> tanh) * 3\n}\n")
    ops = [op for _, op in layers(g)]
    assert ops == ["dense", "relu", "dense", "relu", "tanh"] * 3
    assert sum(op == "dense" for op in ops) == 6


# ---- train section ------------------------------------------------------------

def test_every_train_setting():
    g = check("""
network n {
    input x: 4
    y = x -> dense(2)
}
train {
    data "data/mnist"
    loss mse
    optimizer adam(lr=0.001, beta1=0.85, beta2=0.995, eps=1e-7)
    batch 32
    epochs 3
    seed 42
    weight_decay 5e-4
    jitter 0.05
    validation 0.1
    early_stop(patience=3, min_delta=0.001)
    restarts 4
}
""")
    assert g.graph["train"] == {
        "data": "data/mnist",
        "loss": "mse",
        "optimizer": {"name": "adam", "lr": 0.001, "beta1": 0.85, "beta2": 0.995, "eps": 1e-7},
        "batch": 32,
        "epochs": 3,
        "seed": 42,
        "weight_decay": 5e-4,
        "jitter": 0.05,
        "validation": 0.1,
        "early_stop": {"patience": 3, "min_delta": 0.001},
        "restarts": 4,
    }


@pytest.mark.parametrize("line, expected", [
    ("optimizer sgd(lr=0.1)", {"name": "sgd", "lr": 0.1}),
    ("optimizer sgd(0.1)", {"name": "sgd", "lr": 0.1}),
    ("optimizer momentum(lr=0.01, beta=0.95)", {"name": "momentum", "lr": 0.01, "beta": 0.95}),
    ("optimizer rmsprop(0.001, 0.9, 1e-8)", {"name": "rmsprop", "lr": 0.001, "beta": 0.9, "eps": 1e-8}),
    ("optimizer adam", {"name": "adam"}),
])
def test_optimizers(line, expected):
    g = check(f"network n {{ input x: 4 y = x -> dense(2) }}\ntrain {{\n    {line}\n}}\n")
    assert g.graph["train"]["optimizer"] == expected


def test_early_stop_forms():
    g = check("network n { input x: 4 y = x -> dense(2) }\ntrain { early_stop 4 }")
    assert g.graph["train"]["early_stop"] == {"patience": 4, "min_delta": 0.0}
    g = check("network n { input x: 4 y = x -> dense(2) }\ntrain { early_stop(2) }")
    assert g.graph["train"]["early_stop"] == {"patience": 2, "min_delta": 0.0}


def test_empty_and_missing_train_section():
    assert check("network n { input x: 4 y = x -> dense(2) }\ntrain { }").graph["train"] == {}
    assert check("network n { input x: 4 y = x -> dense(2) }").graph["train"] == {}


def test_data_string_with_escapes():
    g = check('network n { input x: 4 y = x -> dense(2) }\ntrain { data "my \\"dir\\"\\\\x" }')
    assert g.graph["train"]["data"] == 'my "dir"\\x'


# ---- values -------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("0.001", 0.001), ("1e-3", 0.001), ("1E-3", 0.001), ("2.5e-2", 0.025), ("1.", 1.0), (".5", 0.5),
    ("-0.5", -0.5), ("3", 3.0), ("-2", -2.0), ("1e+2", 100.0),
])
def test_decimals(text, value):
    g = check(f"network n {{ input x: 1x2x2 y = x -> conv(1, 1x1, bias=false, weights=[{text}]) }}")
    assert g.nodes["y"]["args"]["weights"][0] == pytest.approx(value)


def test_decimals_in_dropout():
    g = check("network n { input x: 4 y = x -> dropout(0.25) -> dropout(p=5e-1) }")
    assert g.nodes["y.dropout"]["args"]["p"] == 0.25
    assert g.nodes["y.dropout2"]["args"]["p"] == 0.5


@pytest.mark.parametrize("args, k, stride, pad", [
    ("5", (5, 5), (1, 1), (0, 0)),
    ("5x5", (5, 5), (1, 1), (0, 0)),
    ("3x5, stride=2x1, pad=1x2", (3, 5), (2, 1), (1, 2)),
    ("k=3, stride=2, pad=1", (3, 3), (2, 2), (1, 1)),
    ("3, pad=same", (3, 3), (1, 1), "same"),
    ("3, pad=valid", (3, 3), (1, 1), "valid"),
    ("3, 2", (3, 3), (2, 2), (0, 0)),
])
def test_sizes_and_key_value_arguments(args, k, stride, pad):
    g = check(f"network n {{ input x: 1x16x16 y = x -> conv(4, {args}) }}")
    a = g.nodes["y"]["args"]
    assert (a["k"], a["stride"], a["pad"]) == (k, stride, pad)


def test_keyword_arguments_in_any_order_and_booleans():
    g = check("network n { input x: 2x8x8 y = x -> conv(groups=2, bias=false, k=3, out=4) }")
    a = g.nodes["y"]["args"]
    assert (a["out"], a["k"], a["groups"], a["bias"]) == (4, (3, 3), 2, False)
    assert g.nodes["y"]["params"] == {"weight": (4, 1, 3, 3)}


def test_shape_sizes_in_input():
    assert shape(check("network n { input x: 1x28x28 y = x -> relu }"), "x") == (1, 28, 28)
    assert shape(check("network n { input x: 10 y = x -> relu }"), "x") == (10,)


def test_nested_weight_lists_with_negatives():
    g = check("network n {\n    input x: 1x8x8\n"
              "    e = x -> conv(1, 3x3, bias=false, weights=[[0, 1, 0], [1, -4, 1], [0, 1, 0]])\n}\n")
    w = g.nodes["e"]["fixed"]["weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w.reshape(3, 3), [[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    assert g.nodes["e"]["params"] == {"weight": (1, 1, 3, 3)}
    assert g.nodes["e"]["trainable"] is False


def test_weights_with_decimals_and_all_dimensions():
    g = check("network n {\n    input x: 2x4x4\n"
              "    e = x -> conv(2, 1, weights=[[[[0.5]], [[-1e-1]]], [[[-.25]], [[2]]]])\n}\n")
    w = g.nodes["e"]["fixed"]["weight"]
    np.testing.assert_allclose(w.reshape(2, 2), [[0.5, -0.1], [-0.25, 2]])
    assert g.nodes["e"]["params"] == {"weight": (2, 2, 1, 1), "bias": (2,)}


def test_weights_fix_out_and_kernel():
    """With written weights, the output channels and the kernel size may be left out."""
    g = check("network n { input x: 1x8x8 e = x -> conv(weights=[[1, 2], [3, 4]], bias=false) }")
    assert shape(g, "e") == (1, 7, 7)
    assert g.nodes["e"]["params"] == {"weight": (1, 1, 2, 2)}


# ---- the parse tree -----------------------------------------------------------

def test_parse_tree_records():
    f = parse("network n {\n    input x: 4\n    y = x -> dense(2 * 3, bias=false) as d * 1\n}\n"
              "table t { 0: 1 2 }\nblock b(c = 2) { input x }\ntrain { batch 2 }\n", "f.cnn")
    assert [n.name for n in f.networks] == ["n"]
    assert [t.name for t in f.tables] == ["t"] and f.tables[0].rows[0][:2] == (0, [1, 2])
    assert [b.name for b in f.blocks] == ["b"] and f.blocks[0].params[0].default.value == 2
    assert f.trains[0].settings[0].key == "batch"
    binding = f.networks[0].body[1]
    assert binding.name == "y" and binding.source[0] == "x"
    (el,) = binding.chain
    assert (el.call.name, el.label, el.repeat) == ("dense", "d", 1)
    pos, kw = el.call.args
    assert pos.name is None and pos.value.kind == "*"
    assert kw.name == "bias" and kw.value.kind == "word" and kw.value.value == "false"
    assert str(el.call.loc) == "f.cnn:3:14"
