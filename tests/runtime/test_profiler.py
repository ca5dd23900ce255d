"""cnnc_runtime.profiler: per-layer times that add up to the step, measured two ways, and FLOP rates that agree
with the network's MAC count.

Timings on a shared machine vary, so nothing here compares two separate
timings: each check compares sums of the same measured intervals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.pipeline import compile_source, read_source
from cnnc_runtime.model import Model
from cnnc_runtime.parallel import available_cores
from cnnc_runtime.peak import Peak
from cnnc_runtime.profiler import ProfiledModel, _run, check_profile_manifest, profile_inference, profile_training

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PEAK = Peak("test", 16, {1: 100.0, 2: 200.0})  # (the measured peak is cnnc_runtime.peak's; tested there)


def profiled(stem: str, threads: int = 1) -> ProfiledModel:
    path = EXAMPLES / f"{stem}.cnn"
    return ProfiledModel(*compile_source(read_source(path), str(path), profile=True), threads=threads)


@pytest.fixture(scope="module")
def lenet():
    return profiled("lenet5")


def macs_by_layer(model) -> dict[str, int]:
    return {layer["name"]: layer["macs"] for layer in model.manifest["summary_json"]["layers"]}


def check_sums(p) -> None:
    """The lines add up to the measured step; none of the measured parts is counted twice (what remains, the
    overhead, is not negative beyond 10% of the step)."""
    assert sum(line.seconds for line in p.lines) == pytest.approx(p.step_seconds, rel=1e-9)
    assert sum(line.share for line in p.lines) == pytest.approx(1.0, rel=1e-9)
    rest = p.lines[-1]
    assert rest.name.startswith("overhead") and rest.seconds > -0.1 * p.step_seconds
    assert all(line.seconds >= 0 for line in p.lines[:-1])


def check_rates(p, model) -> None:
    """GFLOP/s = flops / time; a forward's flops = 2 x the layer's MACs x the batch; % of the threads' peak."""
    macs = macs_by_layer(model)
    for line in p.lines:
        if line.gflops is None:
            continue
        assert line.gflops * 1e9 * line.seconds == pytest.approx(line.flops, rel=1e-9)
        shares = [line.gflops / PEAK.gflops(t) for t in (1, p.threads)]  # (one image: on one thread, or split)
        assert any(line.peak_share == pytest.approx(share) for share in (shares if p.batch == 1 else shares[1:]))
        if line.phase == "forward":
            assert line.flops == 2 * macs[line.name] * p.batch


@pytest.mark.parametrize("batch", [1, 64])
def test_the_layers_cycle_counts_cover_each_native_call(lenet, batch):
    """Per inference call, the regions' cycles converted to seconds (at the rate read over the run) against the
    same native call timed from Python around it: two clocks over the same interval, equal but for the cost of
    the call itself (a few microseconds). The median over calls, so that one preempted call cannot decide."""
    x = np.random.default_rng(0).standard_normal((batch, *lenet.input_shape), dtype=np.float32)
    lenet(x)
    pairs = []

    def calls() -> None:
        for _ in range(30):
            lenet.timers.native.clear()
            lenet(x)
            pairs.append((lenet.take().sum(), lenet.timers.seconds_in(("infer",))))

    _, rate, _ = _run(lenet, calls)
    ratios = sorted(counted / rate / timed for counted, timed in pairs)
    assert ratios[len(ratios) // 2] == pytest.approx(1.0, abs=0.1 if batch > 1 else 0.3)


def test_a_training_profile_adds_up_to_the_step(lenet):
    p = profile_training(lenet, PEAK, batch=64, steps=6, warmup=2)
    assert (p.mode, p.batch, p.steps, p.threads) == ("train", 64, 6, 1)
    check_sums(p)
    check_rates(p, lenet)
    names = [(line.name, line.phase) for line in p.lines]
    assert names[:2] == [("c1", "forward"), ("s2", "forward")]
    assert ("c1", "backward") in names and ("optimizer", "other") in names and ("data preparation", "other") in names
    assert ("image", "forward") not in names  # the input has no code
    assert all(line.seconds > 0 for line in p.lines if line.name in ("c1", "c3", "optimizer"))


def test_an_inference_profile_adds_up_to_the_call(lenet):
    p = profile_inference(lenet, PEAK, batch=64, calls=20)
    assert (p.mode, p.steps) == ("infer", 20)
    check_sums(p)
    check_rates(p, lenet)
    assert [line.phase for line in p.lines if line.phase not in ("forward", "other")] == ["output"]


BATCHNORM_NET = """network small_bn {
    input image: 1x12x12
    h = image -> conv(4, 3x3, pad=1, bias=false) -> batchnorm -> relu -> maxpool(2x2)
    y = h -> flatten -> dense(16, bias=false) -> batchnorm -> relu -> dense(10)
}"""


def test_batchnorm_phases_and_reductions_on_two_threads():
    """A network with batchnorm trains in phases (the batchnorms' reductions between them), here on 2 threads:
    each layer's time is its cycles on both threads / 2, the reductions are timed on the calling thread."""
    model = ProfiledModel(*compile_source(BATCHNORM_NET, "small_bn.cnn", profile=True), threads=2)
    p = profile_training(model, PEAK, batch=32, steps=3, warmup=1)
    check_sums(p)
    check_rates(p, model)
    assert p.threads == 2 and model.timers.threads_of("step_cross_entropy") == 2
    parts = {line.name: line for line in p.lines if line.phase == "other"}
    assert parts["batchnorm reductions"].seconds > 0
    bn = [line for line in p.lines if line.op.startswith("batchnorm")]
    assert {line.phase for line in bn} == {"forward", "backward"}
    assert p.native["counted"] <= p.native["timed"] * 1.1  # (2 threads: the timed side also waits for the GIL)
    q = profile_inference(model, PEAK, batch=4, calls=5)  # batch 4: one thread; batchnorm folded each call
    check_sums(q)
    assert [line.name for line in q.lines].count("batchnorm folding") == 1


SPLIT_NET = """network split_net {
    input image: 3x32x32
    h = image -> conv(16, 3x3, pad=1) -> relu -> conv(16, 3x3, pad=1) -> relu -> conv(16, 3x3, pad=1) -> relu
    y = h -> maxpool(2x2) -> flatten -> dense(10)
}"""  # 5.2M multiply-adds per image: enough for one image to run on two threads (cnnc.codegen.split)


@pytest.mark.skipif(len(available_cores()) < 2, reason="one image runs split only with two cores")
def test_one_image_split_over_two_threads_is_one_line_per_layer():
    """A small batch runs whole on one thread or split over both (whichever recent calls found faster, the other
    tried now and then): a layer's line adds its time in both ways, and the threads' meetings have a line."""
    model = ProfiledModel(*compile_source(SPLIT_NET, "split_net.cnn", profile=True), threads=2)
    p = profile_inference(model, PEAK, batch=1, calls=48)
    check_sums(p)
    check_rates(p, model)
    keys = [(line.phase, line.name) for line in p.lines]
    assert len(keys) == len(set(keys))
    assert model.timers.threads_of("infer_split") == 2 and model.timers.seconds_in(("infer_split",)) > 0
    assert ("wait", "barriers") in keys
    assert p.native["counted"] <= p.native["timed"] * 1.1


def test_a_network_with_nothing_to_train_still_profiles():
    """filters.cnn: every weight is written in the file; a training step is the forward pass and the loss."""
    model = profiled("filters")
    p = profile_training(model, PEAK, batch=8, steps=2, warmup=1)
    check_sums(p)
    assert not [line for line in p.lines if line.phase == "backward" and line.seconds > 0 and line.flops]


def test_the_profiler_needs_a_profiling_build():
    path = EXAMPLES / "mlp.cnn"
    manifest, obj = compile_source(read_source(path), str(path))
    with pytest.raises(ValueError, match="not a profiling build"):
        ProfiledModel(manifest, obj)
    target = manifest["target"]
    with pytest.raises(ValueError, match="not a profiling build"):
        check_profile_manifest({"target": target, "profile": {"regions": [{"entry": 1}], "clock": "readcyclecounter"}})
    with pytest.raises(ValueError, match="x86 timestamp counter"):
        check_profile_manifest({"target": target | {"triple": "aarch64-unknown-linux-gnu"}, "profile": {}})


def test_the_profile_as_json_data(lenet):
    p = profile_inference(lenet, PEAK, batch=2, calls=3)
    d = p.as_dict()
    assert d["peak_gflops"] == {"1": 100.0}
    assert {"name", "op", "phase", "seconds", "share", "flops", "gflops", "peak_share"} <= set(d["lines"][0])
    assert np.isfinite([line["seconds"] for line in d["lines"]]).all()


# Plain SGD at lr 100 on mse makes the loss of random data non-finite within a few steps (as lr 0.1 does for
# examples/resnet_tiny.cnn, which has no batchnorm, on cross-entropy); at lr 0.1 it stays finite.
DIVERGES = """
network diverges {
    input x: 1x8x8
    out = x -> flatten -> dense(16) -> relu -> dense(4)
}
train {
    loss mse
    optimizer sgd(lr=100)
    batch 16
}
"""


def test_a_recipe_whose_loss_diverges_on_random_data_is_timed_at_a_smaller_learning_rate():
    """A step's work does not depend on the learning rate; the note says which one was timed."""
    model = ProfiledModel(*compile_source(DIVERGES, "diverges.cnn", profile=True))
    p = profile_training(model, PEAK, steps=10)
    check_sums(p)
    assert p.steps == 10
    assert any("learning rate 100 made the loss" in n and "timed at 0.1" in n for n in p.notes), p.notes


def test_more_random_images_than_the_memory_holds_is_a_clear_error(lenet):
    """(`cnnc profile --train --batch 65536 --steps 100000`: 6.5e9 images; was numpy's MemoryError)"""
    with pytest.raises(ValueError, match="random inputs.*more than this machine's"):
        profile_training(lenet, PEAK, batch=65536, steps=100_000)


@pytest.mark.parametrize("stem", ["lenet5", "mnist_modern"])
def test_a_step_in_chunks_has_the_bits_of_one_call_per_kernel(stem):
    """The normal build runs a training step's per-image kernels (convolutions, pools, activations, batchnorm's
    applications) a chunk of images at a time through each phase; the profiling build calls each kernel once on
    the whole shard. Each image's values do not depend on its call, so the gradients are the same bits."""
    path = EXAMPLES / f"{stem}.cnn"
    normal = Model(*compile_source(read_source(path), str(path)), threads=1)
    chunks_of_one = profiled(stem)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, *normal.input_shape), dtype=np.float32)
    labels = rng.integers(0, 10, size=64)
    value, grads = normal.value_and_grad(x, labels, "cross_entropy")
    want_value, want = chunks_of_one.value_and_grad(x, labels, "cross_entropy")
    assert value == want_value
    for name, g in want.items():
        np.testing.assert_array_equal(grads[name], g, err_msg=name)
