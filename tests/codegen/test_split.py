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


def test_resnet20_threads_meet_in_front_of_each_convolution_and_nowhere_else():
    """Each block's add (and its relu) is done by the block's last convolution (``fuse_residuals``), on the rows
    or channels of the shortcut its own share reads: the threads meet in front of each convolution that reads
    what the other thread wrote, and once more in front of the global pool, which runs with the dense layer on one
    thread. A down block's strided 1x1 shortcut does the add of the main path's last convolution, cut by the same
    output channels, so the two share a stretch."""
    stretches = kernels_between_barriers(split_entry("resnet20"))
    kinds = [[re.sub(r"_\d+$", "", k) for k in s] for s in stretches]
    assert len(stretches) - 1 == 19  # (31 with every add waiting; 20 with the adds after their convolutions)
    assert kinds[0] == ["conv_forward"] * 2  # the stem, by output channels
    assert all(set(s) == {"conv_forward"} for s in kinds[:-1]) and not any("sum" in s for s in kinds)
    assert sorted(len(s) for s in kinds[:-1]) == [2] * 17 + [4] * 2  # (the down blocks: 3x3 and 1x1 together)
    assert kinds[-1] == ["pool_forward", "dense_forward"]  # part 0's, after the last barrier
