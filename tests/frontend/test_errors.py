"""Every kind of mistake in a .cnn file: the exact ``file:line:col``, the message, and the caret line.

Syntax errors, names, argument values, tables, written weights, shapes, the
train section and the file's structure, then the command line's exit
statuses. Each case is a small file written out in full so the expected
line and column can be checked by eye.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cnnc.errors import CnnError, Diagnostics
from cnnc.pipeline import check_source, read_source

MISTAKES = importlib.import_module("cnnc.frontend.parse").MISTAKES
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def error_of(source: str) -> CnnError:
    with pytest.raises(CnnError) as info:
        check_source(source, "t.cnn")
    return info.value


def expect(source: str, where: str, message: str) -> CnnError:
    """`source` fails with exactly `message` at `where` ('line:col'), rendered as file:line:col: error: ..."""
    e = error_of(source)
    assert str(e).splitlines()[0] == f"t.cnn:{where}: error: {message}"
    assert e.message == message
    assert str(e.loc) == f"t.cnn:{where}"
    return e


def caret(e: CnnError) -> tuple[str, str]:
    """The source line and the caret line under it."""
    lines = str(e).splitlines()
    assert len(lines) == 3, str(e)
    return lines[1], lines[2]


# ---- syntax errors ----------------------------------------------------------

# (source, line:col, message): at least one per MISTAKES label (see test_every_mistake_label_is_tested).
SYNTAX = [
    ("network n {\n    input x: 4\n    y = x -> relu tanh\n}\n", "4:1",
     "a layer needs '->' before it; to bind a new name write 'NAME = ...' (got '}')"),
    ("network n {\n    input x: 4\n    y = x -> relu sigmoid -> relu\n}\n", "3:27",
     "a layer needs '->' before it; to bind a new name write 'NAME = ...' (got '->')"),
    ("network n {\n    input x: 4\n    y =\n}\n", "4:1",
     "a binding needs a value after '=', like 'y = x -> relu' (got '}')"),
    ("network n {\n    input x: 4\n    y = -> relu\n}\n", "3:9",
     "a binding needs a value after '=', like 'y = x -> relu' (got '->')"),
    ("network n {\n    input x: 4\n    y = x ->\n}\n", "4:1",
     "'->' must be followed by a layer (got '}')"),
    ("network n {\n    input x: 4\n    y = x -> -> relu\n}\n", "3:14",
     "'->' must be followed by a layer (got '->')"),
    ("network n {\n    input x: 4\n    y = x -> dense(10\n}\n", "4:1",
     "unclosed '(' in the arguments (got '}')"),
    ("network n {\n    input x: 1x8x8\n    y = x -> conv(4 3x3)\n}\n", "3:21",
     "arguments are separated by ',' (got '3x3')"),
    ("network n {\n    input x: 4\n    y = x -> dense(10 bias=false)\n}\n", "3:23",
     "arguments are separated by ',' (got 'bias')"),
    ("network n {\n    input x: 1x8x8\n    y = x -> conv(6 5x5)\n}\n", "3:21",
     "arguments are separated by ',' (got '5x5')"),
    ("network n {\n    input x: 1x8x8\n    y = x -> conv(6, 5x5 bias=false)\n}\n", "3:26",
     "arguments are separated by ',' (got 'bias')"),
    ("network n {\n    input x: 1x8x8\n    y = x -> conv(6, 5x5, pad=same stride=2)\n}\n", "3:36",
     "arguments are separated by ',' (got 'stride')"),
    ("table t {\n    0 1 2\n}\n", "2:5",
     "a table row is 'OUT: IN IN ...', like '0: 0 1 2' (got '0')"),
    ("table t {\n    a: 1\n}\n", "2:5",
     "a table row is 'OUT: IN IN ...', like '0: 0 1 2' (got 'a')"),
]


@pytest.mark.parametrize("source, where, message", SYNTAX)
def test_syntax_error(source, where, message):
    expect(source, where, message)


def test_every_mistake_label_is_tested():
    messages = [case[2] for case in SYNTAX] + [case.values[2] for case in SYNTAX_ONCE_GENERIC]
    covered = {label for label in MISTAKES if any(msg.startswith(label) for msg in messages)}
    assert covered == set(MISTAKES)


# Mistakes that once fell through to the generic message.
SYNTAX_ONCE_GENERIC = [
    pytest.param("network n {\n    input x: 4\n    y = x -> relu ->\n}\n", "4:1",
                 "'->' must be followed by a layer (got '}')"),
    pytest.param("network n {\n    input x:\n}\n", "3:1",
                 "an input needs a shape, like 'input image: 1x28x28' or 'input v: 784' (got '}')"),
    pytest.param("network n {\n    input x: y = x -> relu\n}\n", "2:14",
                 "an input needs a shape, like 'input image: 1x28x28' or 'input v: 784' (got 'y')"),
    pytest.param("network n {\n    input x: 4\n    y = x -> dense(4 -> relu\n}\n", "3:22",
                 "unclosed '(' in the arguments (got '->')"),
    pytest.param("network n {\n    input x: 4\n    y = x -> dense(4", "3:21",
                 "unclosed '(' in the arguments (got the end of the file)"),
]


@pytest.mark.parametrize("source, where, message", SYNTAX_ONCE_GENERIC)
def test_syntax_error_once_generic(source, where, message):
    expect(source, where, message)


def test_missing_input_shape_without_colon_is_reported_by_the_lowering():
    expect("network n {\n    input x\n    y = x -> relu\n}\n", "2:11",
           "the network's input needs a shape, like 'input image: 1x28x28' or 'input v: 784'")


def test_generic_expected_message():
    e = expect("network n\n    input x: 4\n}\n", "2:5", "expected '{', got 'input'")
    assert caret(e) == ("    input x: 4", "    ^~~~~")


def test_generic_expected_at_end_of_file():
    e = error_of("network n {\n    input x: 4\n    y = x -> relu\n")
    assert str(e.loc) == "t.cnn:3:18"
    assert e.message.startswith("expected a name, ")
    assert e.message.endswith(" or '}', got the end of the file")
    for word in ("'->'", "'input'", "'output'"):
        assert word in e.message


def test_unexpected_character():
    e = error_of("network n {\n    input x: 4\n    y = x -> relu $\n}\n")
    assert str(e.loc) == "t.cnn:3:19"
    assert e.message.startswith("unexpected character '$'; expected a name, ")
    assert "'->'" in e.message and e.message.endswith(" or '}'")
    assert caret(e) == ("    y = x -> relu $", "                  ^")


def test_unexpected_character_at_the_start():
    expect("@network n {}\n", "1:1", "unexpected character '@'; expected 'block', 'network', 'table' or 'train'")


# ---- names ------------------------------------------------------------------

def test_unknown_layer_did_you_mean():
    e = expect("network lenet5 {\n    input image: 1x32x32\n    c1 = image -> conv(6, 5x5) -> tanh\n"
               "    s2 = c1 -> maxpol(2x2)\n}\n", "4:16", "unknown layer 'maxpol'; did you mean 'maxpool'?")
    assert caret(e) == ("    s2 = c1 -> maxpol(2x2)", "               ^~~~~~")


def test_unknown_layer_without_close_spelling():
    expect("network n {\n    input x: 4\n    y = x -> zzz\n}\n", "3:14", "unknown layer 'zzz'")


def test_unknown_layer_suggests_a_block():
    expect("block stem(c) {\n    input x\n    y = x -> dense(c)\n}\nnetwork n {\n    input x: 4\n"
           "    y = x -> stme(3)\n}\n", "7:14", "unknown layer 'stme'; did you mean 'stem'?")


def test_unknown_argument_did_you_mean():
    e = expect("network n {\n    input x: 1x8x8\n    y = x -> conv(4, 3x3, strid=2)\n}\n", "3:27",
               "conv has no argument 'strid'; did you mean 'stride'?")
    assert caret(e)[1] == " " * 26 + "^~~~~"


def test_unknown_argument_lists_the_choices():
    expect("network n {\n    input x: 4\n    y = x -> dense(4, zzz=1)\n}\n", "3:23",
           "dense has no argument 'zzz'; it takes out, bias")


def test_too_many_positional_arguments():
    expect("network n {\n    input x: 4\n    y = x -> relu(3)\n}\n", "3:19", "relu takes 0 arguments (none), got 1")


def test_missing_required_argument():
    expect("network n {\n    input x: 4\n    y = x -> dense\n}\n", "3:14", "dense needs 'out' (output features)")


def test_argument_given_twice():
    expect("network n {\n    input x: 4\n    y = x -> dense(4, out=5)\n}\n", "3:23", "argument 'out' is given twice")


def test_unknown_name():
    e = expect("network n {\n    input image: 4\n    y = imag -> relu\n}\n", "3:9",
               "unknown name 'imag'; did you mean 'image'?")
    assert caret(e) == ("    y = imag -> relu", "        ^~~~")


def test_unknown_name_in_add():
    expect("network n {\n    input x: 4\n    a = x -> relu\n    y = add(a, b)\n}\n", "4:16", "unknown name 'b'")


def test_use_before_binding():
    expect("network n {\n    input x: 4\n    y = z -> relu\n    z = x -> relu\n}\n", "3:9",
           "'z' is used before it is bound (at line 4)")


def test_name_bound_twice():
    expect("network n {\n    input x: 4\n    y = x -> relu\n    y = y -> tanh\n}\n", "4:5",
           "'y' is bound twice (first at line 3)")


def test_input_name_bound_again():
    expect("network n {\n    input x: 4\n    x = x -> relu\n}\n", "3:5", "'x' is bound twice (first at line 2)")


def test_label_reused():
    e = error_of("network n {\n    input x: 4\n    y = x -> dense(3) as a -> relu\n    z = y -> dense(3) as a\n}\n")
    assert e.message == "the layer name 'a' is already used (at line 3)"
    assert e.loc.line == 4


def test_label_reused_points_at_the_label():
    expect("network n {\n    input x: 4\n    y = x -> dense(3) as a -> relu\n    z = y -> dense(3) as a\n}\n",
           "4:26", "the layer name 'a' is already used (at line 3)")


def test_label_clashing_with_a_binding_name():
    expect("network n {\n    input x: 4\n    y = x -> dense(3)\n    z = y -> dense(3) as y\n}\n", "4:26",
           "the layer name 'y' is already used (at line 3)")


def test_repeated_layer_with_a_label():
    expect("network n {\n    input x: 4\n    y = x -> dense(4) as d * 2\n}\n", "3:26",
           "a repeated layer cannot carry the single label 'd'")


def test_repeat_zero():
    expect("network n {\n    input x: 4\n    y = x -> dense(4) * 0\n}\n", "3:25",
           "a layer is repeated a positive number of times, not 0")


def test_block_uses_itself():
    expect("block b(c) {\n    input x\n    y = x -> b(c)\n}\nnetwork n {\n    input x: 4\n    y = x -> b(2)\n}\n",
           "3:14", "block 'b' uses itself")


def test_block_missing_argument():
    expect("block b(c) {\n    input x\n    y = x -> dense(c)\n}\nnetwork n {\n    input x: 4\n    y = x -> b()\n}\n",
           "7:14", "block b needs 'c'")


def test_block_binds_its_parameter():
    expect("block b(c) {\n    input x\n    c = x -> relu\n}\nnetwork n {\n    input x: 4\n    y = x -> b(2)\n}\n",
           "3:5", "'c' is a parameter of the block and cannot be bound")


def test_block_input_with_a_shape():
    expect("block b(c) {\n    input x: 4\n    y = x -> relu\n}\nnetwork n {\n    input x: 4\n    y = x -> b(2)\n}\n",
           "2:11", "a block's input takes its shape from where the block is used; write 'input x'")


def test_add_needs_two_inputs():
    expect("network n {\n    input x: 4\n    y = add(x)\n}\n", "3:9", "add needs at least two inputs, like add(x, y)")


def test_add_in_the_middle_of_a_chain():
    expect("network n {\n    input x: 4\n    y = x -> add(x, x)\n}\n", "3:14",
           "add joins named tensors and starts a chain: write 'r = add(a, b) -> ...'")


# ---- bad values -------------------------------------------------------------

def net(line: str, shape: str = "1x8x8") -> str:
    """A network whose third line is `line` (so errors are on line 3)."""
    return f"network n {{\n    input x: {shape}\n{line}\n}}\n"


@pytest.mark.parametrize("line, shape, where, message", [
    ("    y = x -> dense(0)", "4", "3:20", "dense argument 'out' must be a positive integer, got 0"),
    ("    y = x -> dense(-3)", "4", "3:20", "dense argument 'out' must be a positive integer, got -3"),
    ("    y = x -> conv(0, 3)", "1x8x8", "3:19", "conv argument 'out' must be a positive integer, got 0"),
    ("    y = x -> conv(4, 0x3)", "1x8x8", "3:22", "conv argument 'k' must be a positive size like 3 or 3x3, got 0x3"),
    ("    y = x -> conv(4, 2.5)", "1x8x8", "3:22", "conv argument 'k' must be a positive size like 3 or 3x3, got 2.5"),
    ("    y = x -> maxpool(0x2)", "1x8x8", "3:22",
     "maxpool argument 'k' must be a positive size like 3 or 3x3, got 0x2"),
    ("    y = x -> dropout(1)", "4", "3:22", "dropout argument 'p' must be a probability in [0, 1), got 1"),
    ("    y = x -> dropout(1.5)", "4", "3:22", "dropout argument 'p' must be a probability in [0, 1), got 1.5"),
    ("    y = x -> dropout(p=-0.1)", "4", "3:24", "dropout argument 'p' must be a probability in [0, 1), got -0.1"),
    ("    y = x -> conv(4, 3, pad=1x2x3)", "1x8x8", "3:29",
     "conv argument 'pad' must be a non-negative int, HxW, same or valid, got 1x2x3"),
    ("    y = x -> conv(4, 3, pad=full)", "1x8x8", "3:29",
     "conv argument 'pad' must be a non-negative int, HxW, same or valid, got 'full'"),
    ("    y = x -> conv(4, 3, groups=0)", "1x8x8", "3:32", "conv argument 'groups' must be a positive integer, got 0"),
    ("    y = x -> dense(4, bias=3)", "4", "3:28", "dense argument 'bias' must be true or false, got 3"),
    ("    y = x -> leaky_relu(alpha=x)", "4", "3:31", "leaky_relu argument 'alpha' must be a number, got 'x'"),
    ("    y = x -> conv(4, 3, connect=3)", "1x8x8", "3:33",
     "conv argument 'connect' must be the name of a table, got 3"),
])
def test_bad_value(line, shape, where, message):
    e = expect(net(line, shape), where, message)
    assert caret(e)[0] == line


def test_stride_zero():
    e = error_of(net("    y = x -> conv(4, 3, stride=0)"))
    assert str(e.loc) == "t.cnn:3:32"
    assert e.message.startswith("conv argument 'stride' must be a positive size like 3 or 3x3, got ")


def test_pad_negative():
    e = error_of(net("    y = x -> conv(4, 3, pad=-1)"))
    assert str(e.loc) == "t.cnn:3:29"
    assert e.message.startswith("conv argument 'pad' must be a non-negative int, HxW, same or valid, got ")


def test_stride_zero_message_quotes_the_value_as_written():
    expect(net("    y = x -> conv(4, 3, stride=0)"), "3:32",
           "conv argument 'stride' must be a positive size like 3 or 3x3, got 0")


def test_pad_negative_message_quotes_the_value_as_written():
    expect(net("    y = x -> conv(4, 3, pad=-1)"), "3:29",
           "conv argument 'pad' must be a non-negative int, HxW, same or valid, got -1")


def test_groups_not_dividing_input_channels():
    expect(net("    y = x -> conv(4, 3, groups=2)", "3x8x8"), "3:14",
           "conv y: 3 input channels cannot be split into 2 groups")


def test_groups_not_dividing_output_channels():
    expect(net("    y = x -> conv(6, 3, groups=4)", "4x8x8"), "3:14",
           "conv y: 6 output channels cannot be split into 4 groups")


def test_connect_and_groups_together():
    expect("network n {\n    input x: 2x8x8\n    y = x -> conv(2, 3, connect=t, groups=2)\n}\n"
           "table t {\n    0: 0\n    1: 1\n}\n", "3:14", "conv: 'connect' and 'groups' cannot be used together")


def test_pool_padding_more_than_half_the_window():
    expect(net("    y = x -> maxpool(3, pad=2)"), "3:14",
           "maxpool y: padding 2x2 is more than half the 3x3 window, so a window could see nothing but padding")


def test_block_arithmetic_division_not_whole():
    expect("block b(c) {\n    input x\n    y = x -> dense(c / 2)\n}\nnetwork n {\n    input x: 4\n"
           "    y = x -> b(3)\n}\n", "3:20", "3 / 2 is not a whole number")


def test_block_arithmetic_division_by_zero():
    expect("block b(c) {\n    input x\n    y = x -> dense(c / 0)\n}\nnetwork n {\n    input x: 4\n"
           "    y = x -> b(3)\n}\n", "3:24", "division by zero")


def test_input_shape_with_a_zero():
    expect("network n {\n    input x: 0x8x8\n    y = x -> relu\n}\n", "2:11",
           "an input shape is CxHxW (like 1x28x28) or a length N, got 0x8x8")


def test_input_shape_with_two_dimensions():
    expect("network n {\n    input x: 8x8\n    y = x -> relu\n}\n", "2:11",
           "an input shape is CxHxW (like 1x28x28) or a length N, got 8x8")


# ---- tables -----------------------------------------------------------------

def tabled(rows: str, out: int = 2, channels: int = 3, table: str = "t") -> str:
    """conv(out) reading `channels` maps through table `t` (rows start on line 6)."""
    return (f"network n {{\n    input x: {channels}x8x8\n    y = x -> conv({out}, 3, connect={table})\n}}\n"
            f"table t {{\n{rows}}}\n")


def test_table_missing_row():
    e = expect(tabled("    0: 0 1\n    2: 1 2\n", out=3), "5:7",
               "table t has no row for output channel 1; every output channel 0..2 needs a row")
    assert caret(e) == ("table t {", "      ^")


def test_table_duplicate_row():
    e = expect(tabled("    0: 0 1\n    0: 1 2\n"), "7:5", "table t: row 0 appears twice (first at line 6)")
    assert caret(e) == ("    0: 1 2", "    ^")


def test_table_row_index_out_of_range():
    expect(tabled("    0: 0 1\n    1: 1 2\n    2: 0\n"), "8:5",
           "table t: row 2 is out of range; conv has 2 output channels (rows 0..1)")


def test_table_channel_index_out_of_range():
    expect(tabled("    0: 0 1\n    1: 1 3\n"), "7:5",
           "table t: row 1 reads input channel 3, but conv y has only 3 input channels (0..2)")


def test_table_channel_listed_twice():
    expect(tabled("    0: 0 0\n    1: 1 2\n"), "6:5", "table t: row 0 lists an input channel twice")


def test_table_row_reading_nothing():
    expect(tabled("    0:\n    1: 1 2\n"), "6:5", "table t: row 0 reads no input channel")


def test_unknown_table():
    expect(tabled("    0: 0 1\n    1: 1 2\n", table="tt"), "3:33", "unknown table 'tt'; did you mean 't'?")


def test_table_defined_twice():
    expect(tabled("    0: 0 1\n    1: 1 2\n") + "table t {\n    0: 0\n}\n", "9:7",
           "table 't' is defined twice (first at line 5)")


# ---- written weights --------------------------------------------------------

def test_weights_of_the_wrong_size_name_the_expected_shape():
    expect(net("    y = x -> conv(1, 3x3, weights=[[1, 2], [3, 4]])"), "3:14",
           "conv y: written weights have shape 2x2; expected 1x1x3x3 (out x in x kh x kw; leading 1s may be left out)")


def test_weights_missing_the_input_channels():
    expect(net("    y = x -> conv(1, 3x3, weights=[[0, 1, 0], [1, -4, 1], [0, 1, 0]])", "2x8x8"), "3:14",
           "conv y: written weights have shape 3x3; expected 1x2x3x3 (out x in x kh x kw; leading 1s may be left out)")


def test_weights_ragged():
    expect(net("    y = x -> conv(1, 3x3, weights=[[0, 1, 0], [1, -4], [0, 1, 0]])"), "3:35",
           "conv argument 'weights': the rows of the list have different lengths")


def test_weights_not_numbers():
    expect(net("    y = x -> conv(1, 3x3, weights=[[a]])"), "3:35",
           "conv argument 'weights' must be a nested list of numbers, like [[0, 1, 0], [1, -4, 1], [0, 1, 0]]")


def test_weights_too_many_dimensions():
    expect(net("    y = x -> conv(1, 1, weights=[[[[[1]]]]])"), "3:33",
           "conv argument 'weights': a list of weights has at most 4 dimensions (out x in x kh x kw)")


def test_weights_nested_deeper_than_numpy_allows():
    error_of(net("    y = x -> conv(1, 1, weights=" + "[" * 70 + "1" + "]" * 70 + ")"))


# ---- shapes -----------------------------------------------------------------

def test_conv_input_smaller_than_the_kernel():
    e = expect("network n {\n    input x: 16x4x4\n    c5 = x -> conv(120, 5x5)\n}\n", "3:15",
               "conv c5: input 16x4x4 is smaller than the 5x5 kernel")
    assert caret(e) == ("    c5 = x -> conv(120, 5x5)", "              ^~~~")


def test_lenet_c5_on_a_too_small_map():
    """LeNet-5 on 28x28 digits without padding: C5 gets 16x4x4."""
    source = (EXAMPLES / "lenet5.cnn").read_text().replace("1x32x32", "1x28x28")
    e = error_of(source)
    assert e.message == "conv c5: input 16x4x4 is smaller than the 5x5 kernel"
    assert (e.loc.line, e.loc.column) == (11, 20)


def test_conv_smaller_than_the_kernel_after_padding():
    expect(net("    y = x -> conv(1, 5, pad=1)", "1x2x2"), "3:14",
           "conv y: input 1x2x2 (padded to 4x4) is smaller than the 5x5 kernel")


def test_pool_window_larger_than_the_input():
    expect(net("    y = x -> maxpool(4)", "1x3x3"), "3:14", "maxpool y: input 1x3x3 is smaller than the 4x4 window")


def test_dense_on_a_non_flat_input():
    expect(net("    f6 = x -> dense(84)", "16x5x5"), "3:15",
           "dense f6: input 16x5x5 is not flat; write 'flatten' before 'dense'")


def test_conv_on_a_flat_input():
    expect(net("    y = x -> conv(2, 3)", "4"), "3:14", "conv y: input 4 is flat; conv needs a CxHxW feature map")


def test_pool_on_a_flat_input():
    expect(net("    y = x -> global_avgpool", "4"), "3:14",
           "global_avgpool y: input 4 is flat; global_avgpool needs a CxHxW feature map")


def test_add_with_different_shapes():
    e = expect("network n {\n    input x: 1x8x8\n    a = x -> conv(2, 3)\n    b = x -> conv(2, 5)\n"
               "    c = add(a, b)\n}\n", "5:9", "add c: inputs must have the same shape, but a is 2x6x6, b is 2x4x4")
    assert caret(e) == ("    c = add(a, b)", "        ^~~")


def test_concat_mismatch():
    expect("network n {\n    input x: 1x8x8\n    a = x -> conv(2, 3)\n    b = x -> conv(2, 5)\n"
           "    c = concat(a, b)\n}\n", "5:9",
           "concat c: inputs must agree in all but the channels, but a is 2x6x6, b is 2x4x4")


def test_concat_of_flat_and_image():
    expect("network n {\n    input x: 1x2x2\n    f = x -> flatten\n    c = concat(x, f)\n}\n", "4:9",
           "concat c: inputs must agree in all but the channels, but x is 1x2x2, f is 4")


# ---- train section ----------------------------------------------------------

def trained(settings: str) -> str:
    """A valid network and a train section whose settings start on line 6."""
    return f"network n {{\n    input x: 4\n    y = x -> dense(2)\n}}\ntrain {{\n{settings}}}\n"


@pytest.mark.parametrize("settings, where, message", [
    ("    lr 0.1\n", "6:5", "unknown training setting 'lr'"),
    ("    epoch 3\n", "6:5", "unknown training setting 'epoch'; did you mean 'epochs'?"),
    ("    optimizer adamz(lr=0.1)\n", "6:15", "unknown optimizer 'adamz'; did you mean 'adam'?"),
    ("    optimizer lbfgs\n", "6:15",
     "unknown optimizer 'lbfgs'; choose sgd, momentum, nesterov, rmsprop, adam, adamw"),
    ("    loss crossentropy\n", "6:10", "unknown loss 'crossentropy'; did you mean 'cross_entropy'?"),
    ("    loss hinge\n", "6:10", "unknown loss 'hinge'; choose cross_entropy or mse"),
    ("    optimizer adam(lr=0)\n", "6:20", "adam argument 'lr' must be a positive number, got 0"),
    ("    optimizer adam(rate=0.1)\n", "6:20",
     "adam has no argument 'rate'; it takes lr, beta1, beta2, eps"),
    ("    optimizer sgd(0.1, 0.2)\n", "6:24", "sgd takes at most 1 arguments (lr)"),
    ("    batch 0\n", "6:11", "'batch' must be a positive integer, got 0"),
    ("    epochs 2.5\n", "6:12", "'epochs' must be a positive integer, got 2.5"),
    ("    seed -1\n", "6:10", "'seed' must be a non-negative integer, got -1"),
    ("    validation 1\n", "6:16", "'validation' must be a fraction in [0, 1), got 1"),
    ("    weight_decay -0.1\n", "6:18", "'weight_decay' must be a non-negative number, got -0.1"),
    ("    data mnist\n", "6:10", 'data takes a quoted path, like data "data/mnist"'),
    ("    loss mse(1)\n", "6:5", "'loss' takes a value, like 'loss 10'"),
    ("    batch 1\n    batch 2\n", "7:5", "training setting 'batch' is given twice"),
    ("    early_stop 0\n", "6:16", "early_stop needs a patience in epochs, got 0"),
])
def test_train_section_mistake(settings, where, message):
    expect(trained(settings), where, message)


def test_two_train_sections():
    expect(trained("") + "train {\n}\n", "7:1", "a file holds one train section")


def test_optimizer_that_is_a_number():
    expect(trained("    optimizer 3\n"), "6:15",
           "unknown optimizer 3; choose sgd, momentum, nesterov, rmsprop, adam, adamw")


# ---- the file's structure ---------------------------------------------------

def test_no_network():
    e = expect("# nothing but a table\ntable t {\n    0: 1\n}\n", "1:1",
               "no network in this file; write 'network NAME { ... }'")
    assert caret(e) == ("# nothing but a table", "^")


def test_empty_file():
    expect("", "1:1", "no network in this file; write 'network NAME { ... }'")


def test_two_networks():
    expect("network a {\n    input x: 4\n    y = x -> relu\n}\nnetwork b {\n    input x: 4\n    y = x -> relu\n}\n",
           "5:9", "a file holds one network; 'a' is already defined at line 1")


def test_missing_input():
    expect("network n {\n}\n", "1:9", "network 'n' has no input; declare one like 'input image: 1x28x28'")


def test_two_inputs():
    expect("network n {\n    input x: 4\n    input z: 4\n    y = x -> relu\n}\n", "3:11",
           "network 'n' already has an input")


def test_no_layers():
    expect("network n {\n    input x: 4\n}\n", "1:9", "network 'n' has no layers")


def test_output_of_an_unknown_name():
    expect("network n {\n    input x: 4\n    y = x -> relu\n    output yy\n}\n", "4:12",
           "unknown name 'yy'; did you mean 'y'?")


def test_output_named_twice():
    expect("network n {\n    input x: 4\n    y = x -> relu\n    output y\n    output y\n}\n", "5:12",
           "network 'n' already names its output at line 4")


def test_block_without_input():
    expect("block b(c) {\n}\nnetwork n {\n    input x: 4\n    y = x -> b(2)\n}\n", "1:7",
           "block 'b' has no input; declare it with 'input x'")


def test_block_with_the_name_of_a_layer():
    expect("block relu() {\n    input x\n    y = x -> tanh\n}\nnetwork n {\n    input x: 4\n    y = x -> tanh\n}\n",
           "1:7", "block 'relu' has the name of a built-in layer")


# ---- warnings ---------------------------------------------------------------

def test_unused_binding_is_a_warning_not_an_error():
    diag = Diagnostics()
    g = check_source("network n {\n    input x: 4\n    a = x -> dense(3)\n    y = x -> relu\n}\n", "t.cnn", diag)
    assert "a" not in g  # pruned: it does not lead to the output
    assert diag.render() == ["t.cnn:3:5: warning: 'a' is bound but never used\n    a = x -> dense(3)\n    ^"]


def test_binding_after_the_output_is_unused():
    diag = Diagnostics()
    check_source("network n {\n    input x: 4\n    y = x -> relu\n    output y\n    z = y -> tanh\n}\n", "t.cnn", diag)
    assert [w.splitlines()[0] for w in diag.render()] == ["t.cnn:5:5: warning: 'z' is bound but never used"]


def test_unused_table_and_block_are_warnings():
    diag = Diagnostics()
    check_source("table t {\n    0: 0\n}\nblock b(c) {\n    input x\n    y = x -> relu\n}\n"
                 "network n {\n    input x: 4\n    y = x -> relu\n}\n", "t.cnn", diag)
    assert [w.splitlines()[0] for w in diag.render()] == [
        "t.cnn:1:7: warning: table 't' is never used",
        "t.cnn:4:7: warning: block 'b' is never used",
    ]


def test_unused_binding_inside_a_block_is_prefixed():
    diag = Diagnostics()
    check_source("block b(c) {\n    input x\n    z = x -> tanh\n    y = x -> relu\n}\n"
                 "network n {\n    input x: 4\n    h = x -> b(1)\n}\n", "t.cnn", diag)
    assert [w.splitlines()[0] for w in diag.render()] == ["t.cnn:3:5: warning: 'h.z' is bound but never used"]


def test_valid_examples_have_no_warnings():
    for path in sorted(EXAMPLES.glob("*.cnn")):
        diag = Diagnostics()
        check_source(path.read_text(), str(path), diag)
        assert diag.render() == [], path.name


# ---- robustness (known bugs) ------------------------------------------------

def test_deeply_nested_groups_are_a_cnn_error_not_a_recursion_error():
    try:
        check_source(net("    y = x -> " + "(" * 600 + "relu" + ")*1" * 600, "4"), "t.cnn")
    except CnnError:
        pass


def test_long_expression_is_a_cnn_error_not_a_recursion_error():
    try:
        check_source("block b(c) {\n    input x\n    y = x -> dense(" + "+".join(["c"] * 1200) + ")\n}\n"
                     "network n {\n    input x: 4\n    y = x -> b(1)\n}\n", "t.cnn")
    except CnnError:
        pass


# ---- the command line -------------------------------------------------------

def cnnc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnc", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_error_exit_status_and_message(tmp_path):
    f = tmp_path / "lenet5.cnn"
    f.write_text("network lenet5 {\n    input image: 1x32x32\n    c1 = image -> conv(6, 5x5) -> tanh\n"
                 "    s2 = c1 -> maxpol(2x2)\n}\n")
    r = cnnc("check", "lenet5.cnn", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == ("lenet5.cnn:4:16: error: unknown layer 'maxpol'; did you mean 'maxpool'?\n"
                        "    s2 = c1 -> maxpol(2x2)\n"
                        "               ^~~~~~\n")
    assert "Traceback" not in r.stderr


def test_cli_warning_and_error_together(tmp_path):
    f = tmp_path / "w.cnn"
    f.write_text("network n {\n    input x: 4\n    a = x -> relu\n    y = x -> conv(2, 3)\n}\n")
    r = cnnc("check", str(f))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == f"{f}:3:5: warning: 'a' is bound but never used"
    assert lines[3] == f"{f}:4:14: error: conv y: input 4 is flat; conv needs a CxHxW feature map"
    assert "Traceback" not in r.stderr


def test_cli_missing_file_exits_2_with_one_line(tmp_path):
    r = cnnc("check", str(tmp_path / "nope.cnn"))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr == f"cnnc: {tmp_path / 'nope.cnn'}: no such file\n"


def test_cli_bad_flag_exits_2_with_one_line():
    r = cnnc("check", "--bogus", str(EXAMPLES / "mlp.cnn"))
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1
    assert "--bogus" in r.stderr and "Traceback" not in r.stderr


def test_cli_not_utf8_is_a_user_error(tmp_path):
    f = tmp_path / "bin.cnn"
    f.write_bytes(b"\xff\xfenetwork")
    r = cnnc("check", str(f))
    assert r.returncode == 1
    assert r.stderr == f"error: {f}: not a UTF-8 text file (invalid start byte at byte 0)\n"


def test_cli_version():
    import cnnc as package

    r = cnnc("--version")
    assert r.returncode == 0
    assert r.stdout == f"cnnc {package.__version__}\n"


@pytest.mark.parametrize("command, words", [
    ("check", ["usage: cnnc check", "--json", "file"]),
    ("graph", ["usage: cnnc graph", "-o FILE.dot", "--fused", "file"]),
])
def test_cli_help(command, words):
    r = cnnc(command, "--help")
    assert r.returncode == 0
    assert r.stderr == ""
    for w in words:
        assert w in r.stdout


# ---- hostile literals, encodings, long lines and unreadable files -------------------

@pytest.mark.parametrize("literal, where", [
    ("dense(" + "9" * 5000 + ")", "3:20"),
    ("conv(4, " + "7" * 40 + "x3)", "3:22"),
    ("relu * " + "1" * 300, "3:21"),
], ids=["argument", "size", "repeat"])
def test_an_integer_too_large_is_a_located_error(literal, where):
    e = error_of(f"network n {{\n    input x: 1x8x8\n    y = x -> {literal}\n}}\n")
    assert str(e.loc) == f"t.cnn:{where}"
    assert e.message.startswith("integer too large: ") and len(e.message) < 120


def test_an_input_shape_too_large_to_write_is_a_located_error():
    e = error_of(f"network n {{\n    input x: 1x{'5' * 30}\n    y = x -> relu\n}}\n")
    assert str(e.loc) == "t.cnn:2:14" and e.message.startswith("integer too large")


@pytest.mark.parametrize("weights", ["[[1e39]]", "[[-3.5e38]]", "[[1e999]]",
                                     "[[" + " * ".join(["99999999999999999"] * 5) + "]]"])
def test_weights_beyond_float32_are_refused(weights, recwarn):
    e = error_of(f"network n {{\n    input x: 1x3x3\n    y = x -> conv(1, 1x1, weights=[{weights}])\n}}\n")
    assert str(e.loc).startswith("t.cnn:3:")
    assert "not a float32 number" in e.message or "number too large" in e.message
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_leading_byte_order_mark_is_accepted():
    g = check_source("\ufeffnetwork n {\n    input x: 4\n    y = x -> dense(2)\n}\n", "t.cnn")
    assert g.nodes["y"]["shape"] == (2,)


def test_a_long_line_is_cut_around_the_caret():
    padding = "z = x -> relu  " * 70_000
    e = error_of(f"network n {{ input x: 4  {padding} w = q -> relu }}\n")
    line, marks = caret(e)
    assert len(line) < 300 and line.startswith("network n {") and line.endswith("...")
    assert line[marks.index("^"):].startswith("z = x")  # the second 'z': bound twice

    far = error_of(f"network n {{ input x: 4  y = x -> relu {' ' * 100_000} w = q -> relu }}\n")
    line, marks = caret(far)
    assert line.startswith("...") and len(line) < 300
    assert line[marks.index("^"):].startswith("q")


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, says", [
    (lambda d: d, "is a directory"),
    (lambda d: written(d / "bad.cnn", b"network \xff\xfe {"), "not a UTF-8 text file"),
    (lambda d: Path("/proc/self/mem"), "cannot read"),
    (lambda d: d / "missing.cnn", "cannot read"),
], ids=["directory", "invalid-utf8", "proc-self-mem", "missing"])
def test_an_unreadable_source_is_one_line(tmp_path, make, says):
    path = make(tmp_path)
    if str(path).startswith("/proc") and not path.exists():
        pytest.skip(f"no {path} here")
    with pytest.raises(CnnError) as info:
        read_source(path)
    assert says in str(info.value) and len(str(info.value).splitlines()) == 1


RESIDUAL = """block residual(c) {
    input x
    y   = x -> conv(c, 3x3, pad=same) -> relu -> conv(c, 3x3, pad=same)
    out = add(x, y) -> relu
}
block stage(c) {
    input x
    y = x -> residual(c)
}
network n {
    input image: 3x8x8
    s = image -> conv(16, 3x3, pad=same) -> stage(32)
}
"""


def test_an_error_inside_a_block_names_each_use_that_led_there():
    lines = str(error_of(RESIDUAL)).splitlines()
    assert lines[0].startswith("t.cnn:4:11: error: add s.2.y.out.add: inputs must have the same shape")
    assert lines[3:] == [
        "t.cnn:8:14: note: in block 'residual' used here",
        "    y = x -> residual(c)",
        "             ^~~~~~~~",
        "t.cnn:12:45: note: in block 'stage' used here",
        "    s = image -> conv(16, 3x3, pad=same) -> stage(32)",
        "                                            ^~~~~",
    ]


def test_a_lowering_error_inside_a_block_names_its_use():
    e = error_of(RESIDUAL.replace("relu -> conv(c", "relu -> conv(q"))
    assert e.message.startswith("conv argument 'out' must be")
    assert [(str(loc), note) for loc, note in e.notes] == [("t.cnn:8:14", "in block 'residual' used here"),
                                                           ("t.cnn:12:45", "in block 'stage' used here")]
