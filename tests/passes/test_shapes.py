"""Shape inference, table-driven, with every expected shape worked out by hand.

Conv and pooling: ``floor((in + pad_before + pad_after - k) / stride) + 1``, with a dilated
conv's span ``d (k - 1) + 1`` in place of k;
``pad=same`` gives ``ceil(in / stride)`` with the odd pixel of padding at the
bottom/right; shapes leave out the batch.
"""

from __future__ import annotations

import pytest

from cnnc.errors import CnnError, Diagnostics
from cnnc.passes import counts, shapes
from cnnc.pipeline import check_source


def chain(input_shape: str, layers: str):
    """The checked graph of `y = x -> LAYERS` on an input of `input_shape`."""
    diag = Diagnostics()
    g = check_source(f"network n {{\n    input x: {input_shape}\n    y = x -> {layers}\n}}\n", "t.cnn", diag)
    assert diag.render() == []
    return g


def out_shape(g) -> tuple:
    return g.nodes[g.graph["output"]]["shape"]


# (input, chain, output shape), each computed by hand in the comment.
CASES = [
    # conv: stride and padding as int, HxW, same, valid
    ("1x32x32", "conv(6, 5x5)", (6, 28, 28)),                       # 32-5+1
    ("1x32x32", "conv(6, 5)", (6, 28, 28)),                         # square kernel from an int
    ("3x32x32", "conv(8, 3, stride=2)", (8, 15, 15)),               # (32-3)//2+1 = 15
    ("3x32x32", "conv(8, 3, pad=1)", (8, 32, 32)),                  # 32+2-3+1
    ("3x32x32", "conv(8, 5, stride=2, pad=2)", (8, 16, 16)),        # (32+4-5)//2+1 = 16
    ("3x31x31", "conv(8, 3, stride=2, pad=1)", (8, 16, 16)),        # (31+2-3)//2+1 = 16
    ("1x8x8", "conv(2, 3, stride=2x1)", (2, 3, 6)),                 # H (8-3)//2+1 = 3, W 8-3+1 = 6
    ("1x10x12", "conv(2, 3, pad=2x0)", (2, 12, 10)),                # H 10+4-3+1, W 12-3+1
    ("3x10x10", "conv(4, 3, pad=valid)", (4, 8, 8)),
    ("3x10x10", "conv(4, 3, pad=same)", (4, 10, 10)),
    ("3x10x10", "conv(4, 4, pad=same)", (4, 10, 10)),               # even kernel, stride 1: pads 1 + 2
    ("1x7x7", "conv(2, 4, stride=2, pad=same)", (2, 4, 4)),         # ceil(7/2) = 4
    ("1x8x8", "conv(2, 4, stride=2, pad=same)", (2, 4, 4)),         # ceil(8/2) = 4
    ("1x9x6", "conv(1, 2x4, stride=2x3, pad=same)", (1, 5, 2)),     # ceil(9/2) = 5, ceil(6/3) = 2
    ("1x5x5", "conv(1, 7, pad=same)", (1, 5, 5)),                   # same even when the kernel is larger
    ("1x1x1", "conv(3, 1)", (3, 1, 1)),
    # groups
    ("4x8x8", "conv(8, 3, groups=4)", (8, 6, 6)),
    ("4x8x8", "conv(4, 3, groups=4, pad=1)", (4, 8, 8)),            # depthwise
    # asymmetric kernels
    ("1x28x28", "conv(4, 1x7)", (4, 28, 22)),
    ("1x28x28", "conv(4, 7x1, pad=3x0)", (4, 28, 28)),
    ("1x28x20", "conv(4, 5x3, stride=3x2)", (4, 8, 9)),             # (28-5)//3+1 = 8, (20-3)//2+1 = 9
    # dilation: floor((in + 2p - d(k-1) - 1)/s) + 1
    ("1x10x10", "conv(2, 3, dilation=2)", (2, 6, 6)),               # 10-2*2-1+1 = 6
    ("1x10x10", "conv(2, 3, dilation=2, pad=2)", (2, 10, 10)),      # 10+4-4-1+1
    ("1x11x12", "conv(2, 3x2, stride=2, pad=1, dilation=2x3)", (2, 5, 6)),  # (11+2-4-1)//2+1, (12+2-3-1)//2+1
    ("1x9x9", "conv(2, 3, dilation=3, pad=same)", (2, 9, 9)),       # same pads d(k-1) = 6
    ("1x7x7", "conv(2, 1, dilation=4)", (2, 7, 7)),                 # a 1x1 kernel spans 1 whatever the dilation
    ("4x9x9", "conv(4, 3, groups=2, dilation=4)", (4, 1, 1)),       # 9-8-1+1
    # pooling, explicit strides and padding
    ("6x28x28", "maxpool(2x2)", (6, 14, 14)),
    ("6x28x28", "avgpool(2)", (6, 14, 14)),
    ("1x7x7", "maxpool(2)", (1, 3, 3)),                             # floor(7/2)
    ("1x7x7", "maxpool(3, stride=2)", (1, 3, 3)),                   # (7-3)//2+1
    ("1x8x8", "maxpool(3, stride=2, pad=1)", (1, 4, 4)),            # (8+2-3)//2+1
    ("1x8x8", "avgpool(3, stride=2, pad=1)", (1, 4, 4)),
    ("1x5x5", "avgpool(3, stride=1, pad=1)", (1, 5, 5)),
    ("1x5x5", "maxpool(2, stride=1)", (1, 4, 4)),
    ("1x8x9", "avgpool(2x3)", (1, 4, 3)),                           # stride defaults to the window
    ("1x8x9", "maxpool(2x3, stride=1x3)", (1, 7, 3)),
    ("1x7x7", "maxpool(2, pad=same)", (1, 4, 4)),                   # ceil(7/2)
    ("1x12x12", "maxpool(3, stride=2, pad=1x0)", (1, 6, 5)),        # (12+2-3)//2+1 = 6, (12-3)//2+1 = 5
    # global_avgpool, flatten, dense
    ("16x5x5", "global_avgpool", (16,)),
    ("16x1x1", "global_avgpool", (16,)),
    ("16x5x5", "flatten", (400,)),
    ("10", "flatten", (10,)),
    ("120", "dense(84)", (84,)),
    ("16x5x5", "flatten -> dense(120)", (120,)),
    ("3x4x5", "global_avgpool -> dense(7, bias=false)", (7,)),
    # element-wise layers keep the shape
    ("3x4x5", "relu", (3, 4, 5)),
    ("3x4x5", "sigmoid", (3, 4, 5)),
    ("3x4x5", "tanh", (3, 4, 5)),
    ("3x4x5", "leaky_relu(alpha=0.2)", (3, 4, 5)),
    ("3x4x5", "elu", (3, 4, 5)),
    ("3x4x5", "elu(alpha=0.5) -> gelu -> silu", (3, 4, 5)),
    ("3x4x5", "dropout(0.5)", (3, 4, 5)),
    ("3x4x5", "softmax", (3, 4, 5)),
    ("10", "relu -> sigmoid -> tanh -> leaky_relu -> dropout(0.1) -> softmax", (10,)),
    # a whole pipeline: LeNet-5 on 32x32
    ("1x32x32", "conv(6, 5) -> tanh -> avgpool(2) -> conv(16, 5) -> avgpool(2) -> conv(120, 5) -> flatten",
     (120,)),
]


@pytest.mark.parametrize("input_shape, layers, expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_shape(input_shape, layers, expected):
    assert out_shape(chain(input_shape, layers)) == expected


@pytest.mark.parametrize("input_shape, layers, pads", [
    ("1x7x7", "conv(2, 4, stride=2, pad=same)", (1, 2, 1, 2)),      # total (4-1)*2+4-7 = 3
    ("1x8x8", "conv(2, 4, stride=2, pad=same)", (1, 1, 1, 1)),      # total (4-1)*2+4-8 = 2
    ("1x10x10", "conv(2, 4, pad=same)", (1, 2, 1, 2)),              # total 3
    ("1x10x10", "conv(2, 3, pad=same)", (1, 1, 1, 1)),
    ("1x9x6", "conv(1, 2x4, stride=2x3, pad=same)", (0, 1, 0, 1)),  # H (5-1)*2+2-9 = 1, W (2-1)*3+4-6 = 1
    ("1x8x8", "conv(2, 3, stride=2, pad=same)", (0, 1, 0, 1)),      # (4-1)*2+3-8 = 1
    ("1x10x12", "conv(2, 3, pad=2x0)", (2, 2, 0, 0)),
    ("1x10x12", "conv(2, 3, pad=valid)", (0, 0, 0, 0)),
    ("1x7x7", "maxpool(2, pad=same)", (0, 1, 0, 1)),                # (4-1)*2+2-7 = 1
    ("1x9x9", "conv(2, 3, dilation=3, pad=same)", (3, 3, 3, 3)),    # the dilated span 7: total 6
    ("1x8x8", "conv(2, 2, dilation=3, pad=same)", (1, 2, 1, 2)),    # span 4: total 3, odd one bottom/right
    ("1x9x9", "conv(2, 3, stride=2, dilation=2, pad=same)", (2, 2, 2, 2)),  # (5-1)*2+5-9 = 4
])
def test_resolved_padding(input_shape, layers, pads):
    g = chain(input_shape, layers)
    assert g.nodes["y"]["geometry"]["pads"] == pads


@pytest.mark.parametrize("input_shape, layers, weight", [
    ("4x8x8", "conv(8, 3, groups=4)", (8, 1, 3, 3)),
    ("4x8x8", "conv(8, 3, groups=2)", (8, 2, 3, 3)),
    ("6x8x8", "conv(6, 3x5, groups=3)", (6, 2, 3, 5)),
    ("3x8x8", "conv(5, 2x1)", (5, 3, 2, 1)),
    ("400", "dense(120)", (120, 400)),
])
def test_parameter_shapes(input_shape, layers, weight):
    g = chain(input_shape, layers)
    assert g.nodes["y"]["params"]["weight"] == weight
    assert g.nodes["y"]["params"]["bias"] == (weight[0],)


def graph(body: str, input_shape: str = "2x8x8"):
    diag = Diagnostics()
    g = check_source(f"network n {{\n    input x: {input_shape}\n{body}\n}}\n", "t.cnn", diag)
    assert diag.render() == []
    return g


def test_add_of_same_shapes():
    g = graph("    a = x -> conv(4, 3, pad=1)\n    b = x -> conv(4, 1)\n    s = add(a, b, a)")
    assert g.nodes["s"]["shape"] == (4, 8, 8)


def test_add_of_flat_tensors():
    g = graph("    a = x -> dense(6)\n    b = x -> dense(6)\n    s = add(a, b) -> relu", "3")
    assert out_shape(g) == (6,)


def test_concat_images_joins_channels():
    g = graph("    a = x -> conv(3, 3, pad=1)\n    b = x -> conv(5, 1)\n    c = concat(a, b, x)")
    assert g.nodes["c"]["shape"] == (10, 8, 8)  # 3 + 5 + 2


def test_concat_of_one_name_twice():
    g = graph("    c = concat(x, x)")
    assert g.nodes["c"]["shape"] == (4, 8, 8)


def test_concat_flat_vectors():
    g = graph("    a = x -> dense(4)\n    b = x -> dense(6)\n    c = concat(a, b) -> dense(3)", "5")
    assert g.nodes["c.concat"]["shape"] == (10,)
    assert g.nodes["c"]["params"]["weight"] == (3, 10)


def test_concat_then_conv():
    g = graph("    a = x -> conv(3, 3, pad=same)\n    b = x -> maxpool(3, stride=1, pad=1)\n"
              "    c = concat(a, b) -> conv(6, 1)")
    assert g.nodes["c.concat"]["shape"] == (5, 8, 8)
    assert g.nodes["c"]["params"]["weight"] == (6, 5, 1, 1)


def test_every_node_has_a_shape():
    g = graph("    a = x -> conv(4, 3, pad=1) -> relu\n    b = add(a, a) -> maxpool(2) -> flatten -> dense(3)")
    for name in g.nodes:
        assert isinstance(g.nodes[name]["shape"], tuple)
    assert out_shape(g) == (3,)


def test_enormous_sizes_are_exact(monkeypatch):
    monkeypatch.setattr(shapes, "MAX_TENSOR", 10**30)  # (refused by default: see below)
    monkeypatch.setattr(counts, "physical_memory", lambda: None)
    g = chain("1x100000x100000", "conv(8, 3, pad=1) -> maxpool(2) -> flatten")
    assert g.nodes["y"]["shape"] == (8, 100000, 100000)
    assert out_shape(g) == (8 * 50000 * 50000,)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_shapes_agree_with_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cases = [
        ("3x32x32", "conv(8, 5, stride=2, pad=2)", nn.Conv2d(3, 8, 5, stride=2, padding=2)),
        ("3x31x29", "conv(6, 3x5, stride=2x3, pad=1x2)", nn.Conv2d(3, 6, (3, 5), stride=(2, 3), padding=(1, 2))),
        ("4x9x9", "conv(8, 3, groups=4)", nn.Conv2d(4, 8, 3, groups=4)),
        ("3x10x10", "conv(4, 3, pad=same)", nn.Conv2d(3, 4, 3, padding="same")),
        ("3x10x10", "conv(4, 4, pad=same)", nn.Conv2d(3, 4, 4, padding="same")),
        ("1x8x8", "maxpool(3, stride=2, pad=1)", nn.MaxPool2d(3, stride=2, padding=1)),
        ("1x9x7", "avgpool(2x3, stride=1x2, pad=1)", nn.AvgPool2d((2, 3), stride=(1, 2), padding=1)),
        ("1x7x7", "maxpool(2)", nn.MaxPool2d(2)),
        ("16x5x5", "global_avgpool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(0))),
        ("16x5x5", "flatten -> dense(120)", nn.Sequential(nn.Flatten(0), nn.Linear(400, 120))),
    ]
    for input_shape, layers, module in cases:
        x = torch.zeros(1, *map(int, input_shape.split("x")))
        if isinstance(module, nn.Sequential):
            x = x[0]
        y = module(x)
        expected = tuple(y.shape[1:] if y.dim() == 4 else y.shape)
        assert out_shape(chain(input_shape, layers)) == expected, layers


def test_a_dilated_kernel_too_large_for_its_input_names_its_span():
    from cnnc.errors import CnnError

    with pytest.raises(CnnError, match=r"conv y: input 1x4x4 is smaller than the 5x5 kernel \(3x3 dilated by 2x2\)"):
        check_source("network n {\n    input x: 1x4x4\n    y = x -> conv(2, 3, dilation=2)\n}\n")


@pytest.mark.parametrize("input_shape, layers, where, what", [
    ("1x28x28", "conv(1000000000, 3x3)", "3:14", "conv y: its output would have 676,000,000,000 elements"),
    ("1x100000x100000", "relu", "2:11", "input x: its output would have 10,000,000,000 elements"),
    ("784", "dense(1000000000)", "3:14", "dense y: its weight parameter would have 784,000,000,000 elements"),
    ("3x300x300", "conv(50000, 200x200)", "3:14", "conv y: its weight parameter would have 6,000,000,000 elements"),
], ids=["conv-output", "input", "dense-weight", "conv-weight"])
def test_tensors_too_large_for_memory_are_refused_at_check_time(input_shape, layers, where, what):
    with pytest.raises(CnnError) as info:
        chain(input_shape, layers)
    assert str(info.value.loc) == f"t.cnn:{where}"
    assert info.value.message.startswith(what) and "at most 2,147,483,647" in info.value.message


def test_a_network_larger_than_the_machine_memory_is_refused(monkeypatch):
    monkeypatch.setattr(counts, "physical_memory", lambda: 1 << 19)  # a machine with 512 KiB
    chain("784", "dense(100)")  # 317 KiB of weights and activations: fits
    with pytest.raises(CnnError, match=r"dense y.2: the network's parameters .* more than this machine's") as info:
        chain("784", "dense(100) -> dense(1000)")
    assert str(info.value.loc) == "t.cnn:3:28"
