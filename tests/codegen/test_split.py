"""Where the threads sharing one image meet (``cnnc.codegen.split``): a barrier goes in front of a layer only where
one thread's share reads what the other wrote, or overwrites what it read, since the last barrier."""

from __future__ import annotations

import re
from pathlib import Path

from cnnc.codegen.module import build_module
from cnnc.pipeline import Build

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def split_entry(stem: str) -> str:
    """The LLVM IR of example `stem`'s ``infer_split``."""
    modules, _ = build_module(Build((EXAMPLES / f"{stem}.cnn").read_text(), f"{stem}.cnn").optimized(), 16)
    text = "\n".join(str(m) for m in modules)
    start = text.index('define void @"infer_split"')
    return text[start:text.index("\n}", start)]


def kernels_between_barriers(body: str) -> list[list[str]]:
    """The kernels each stretch between two barriers calls, in order (their names without the network's)."""
    stretches: list[list[str]] = [[]]
    for kernel in re.findall(r'call void @"\w+\.(\w+)"', body):
        if kernel.startswith("barrier"):
            stretches.append([])
        else:
            stretches[-1].append(kernel)
    return stretches


def test_resnet20_threads_meet_in_front_of_each_convolution_and_not_in_front_of_a_blocks_add():
    """Each thread's share of an identity block's add is the rows of every channel its own share of the
    convolution before wrote (and of the block's input, which its share of the last add wrote), and the add writes
    no slot that the other thread's convolution still reads: the threads meet in front of the convolutions, in front
    of the first down block's add (its strided shortcut is cut by channels, the main path by rows) and once more in
    front of the global pool, which runs with the dense layer on one thread."""
    stretches = kernels_between_barriers(split_entry("resnet20"))
    kinds = [[re.sub(r"_\d+$", "", k) for k in s] for s in stretches]
    assert len(stretches) - 1 == 20  # (was 31: every add, both down blocks' shortcuts and the dense layer waited)
    assert kinds[0] == ["conv_forward"] * 2  # the stem, by output channels
    adds = [s for s in kinds if "sum" in s]
    assert len(adds) == 9
    assert sum(s[0] == "conv_forward" for s in adds) == 8  # each in the stretch of the conv it follows
    assert kinds[-1] == ["pool_forward", "dense_forward"]  # part 0's, after the last barrier
