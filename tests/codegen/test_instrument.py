"""The profiling build (cnnc.codegen.instrument): a counter per region there, nothing in the normal build."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnc.codegen.module import build_module
from cnnc.codegen.target import host_target
from cnnc.compiler import ir_key
from cnnc.pipeline import Build

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def optimized(stem: str):
    return Build((EXAMPLES / f"{stem}.cnn").read_text(), f"{stem}.cnn").optimized()


def test_the_normal_build_has_no_counters_and_keeps_its_cache_key():
    g = optimized("lenet5")
    modules, facts = build_module(g, 16)
    text = str(modules[0])
    assert facts["profile"] is None
    assert "readcyclecounter" not in text and "profile_" not in text
    target = host_target()
    assert ir_key(g, target) == ir_key(g, target, "")  # (the normal build's key is computed as it always was)
    assert ir_key(g, target, "profile") != ir_key(g, target)


def test_the_profiling_build_counts_every_layer_of_every_entry_point():
    g = optimized("lenet5")
    modules, facts = build_module(g, 16, profile=True)
    text = str(modules[0])
    assert "llvm.readcyclecounter" in text and "profile_take" in text
    regions = facts["profile"]
    assert f"[{len(regions)} x i64] zeroinitializer" in text
    forward = [r["layer"] for r in regions if r["entry"] == "step_cross_entropy" and r["phase"] == "forward"]
    backward = [r["layer"] for r in regions if r["entry"] == "step_cross_entropy" and r["phase"] == "backward"]
    assert forward[:3] == ["image", "c1", "s2"]
    assert backward[-1] == "c1"  # last: the first layer's weight gradient
    assert {r["entry"] for r in regions} == {"infer", "step_cross_entropy", "step_mse"}  # (too small to split)
    assert [r["op"] for r in regions if r["phase"] == "loss"] == ["cross_entropy", "mse"]


@pytest.mark.parametrize("stem", ["lenet5", "mnist_modern", "resnet_tiny"])
def test_the_regions_flops_are_twice_the_networks_macs_forward(stem):
    """Forward: 2 x each layer's MACs; the whole forward pass: 2 x the network's MAC count (`cnnc check`)."""
    g = optimized(stem)
    _, facts = build_module(g, 8, profile=True)
    for entry in ("infer", "step_cross_entropy"):
        flops = sum(r["flops"] for r in facts["profile"] if r["entry"] == entry and r["phase"] == "forward")
        assert flops == 2 * g.graph["totals"]["total_macs"]


def test_a_backward_counts_one_product_per_gradient_it_computes():
    """LeNet-5's C1 reads the image: no input gradient, its weight gradient alone; C3 computes both."""
    g = optimized("lenet5")
    _, facts = build_module(g, 8, profile=True)
    step = {(r["phase"], r["layer"]): r["flops"] for r in facts["profile"] if r["entry"] == "step_mse"}
    assert step[("backward", "c1")] == step[("forward", "c1")]
    assert step[("backward", "c3")] == 2 * step[("forward", "c3")]
    assert step[("backward", "s2")] == 0


def test_a_batchnorm_phase_boundary_reopens_the_same_region():
    """mnist_modern's step is cut at each batchnorm's reductions: each phase function times its own pieces, into
    the batchnorm's one forward and one backward region."""
    g = optimized("mnist_modern")
    modules, facts = build_module(g, 8, profile=True)
    keys = [(r["entry"], r["phase"], r["layer"]) for r in facts["profile"]]
    assert len(keys) == len(set(keys))
    text = str(modules[0])
    phases = [line for line in text.splitlines() if line.startswith("define void @\"step_cross_entropy")]
    assert len(phases) > 1
    for line in phases:  # every phase reads the clock
        body = text[text.index(line):]
        body = body[:body.index("\n}")]
        assert "llvm.readcyclecounter" in body


def test_one_image_on_two_threads_counts_each_layer_and_the_waits():
    """A network large enough for ``infer_split`` (cnnc.codegen.split): its layers are regions of that entry too,
    and the barriers where its threads meet are a region of their own."""
    g = optimized("cifar_small")
    _, facts = build_module(g, 8, profile=True)
    split = [(r["phase"], r["layer"]) for r in facts["profile"] if r["entry"] == "infer_split"]
    whole = [(r["phase"], r["layer"]) for r in facts["profile"] if r["entry"] == "infer"]
    assert [k for k in split if k[0] != "wait"] == whole
    assert ("wait", "barriers") in split
