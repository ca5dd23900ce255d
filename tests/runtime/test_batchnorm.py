"""Batchnorm in a whole network: training against the float64 reference on any thread count, inference (folded
and not), the running statistics, and the state in ``buffers``, saved files and artifacts."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnc.reference import reference_forward
from cnnc_runtime.distributed import Local, RankReducer
from cnnc_runtime.model import Model, load
from cnnc_runtime.optimizers import add_weight_decay
from tests.reference import _compiled, graph, reference_value_and_grad
from tests.runtime.test_train import blobs

# bn1 folds into conv1 (and relu with it), bn2 follows a pool (unfolded), bn3 folds into a dense layer,
# bn4 follows a conv without bias and is the network's output's input.
MAPS = """
network bnnet {
    input image: 3x8x8
    c1 = image -> conv(4, 3x3, pad=same) as conv1 -> batchnorm as bn1 -> relu
    p = c1 -> maxpool(2x2) -> batchnorm(momentum=0.3, eps=0.001) as bn2
    r = add(p, p) -> relu
    c2 = r -> conv(5, 1x1, bias=false) as conv2 -> batchnorm as bn4 -> relu
    f = c2 -> flatten -> dense(6) as fc1 -> batchnorm as bn3 -> tanh
    logits = f -> dense(3) as fc2
}
"""
# a vector network whose first layer normalizes the input itself (no gradient flows into the image)
VECTORS = """
network bnvec {
    input x: 7
    h = x -> batchnorm as bn0 -> dense(9) as fc1 -> batchnorm as bn1 -> relu
    out = h -> dense(4) as fc2
}
"""
# residual adds after a batchnorm (run as one kernel with the add, and the add's relu, in training): the
# image as the other input (no gradient), two batchnorms into one add, an add without an activation whose
# output has two readers, and one followed by gelu (whose gradient reads the add's output)
RESIDUAL = """
network bnres {
    input image: 3x8x8
    a  = image -> conv(3, 3x3, pad=same, bias=false) as conv1 -> batchnorm as bn1
    r0 = add(image, a) -> relu
    b  = r0 -> conv(4, 3x3, pad=same, bias=false) as conv2 -> batchnorm as bn2 -> relu
              -> conv(4, 3x3, pad=same, bias=false) as conv3 -> batchnorm as bn3
    sc = r0 -> conv(4, 1x1, bias=false) as conv4 -> batchnorm as bn4
    r1 = add(sc, b) -> relu
    c  = r1 -> conv(4, 3x3, pad=same, bias=false) as conv5 -> batchnorm as bn5
    r2 = add(r1, c)
    d  = r2 -> conv(4, 3x3, pad=same, bias=false) as conv6 -> batchnorm as bn6
    r3 = add(r2, d) -> gelu
    logits = r3 -> flatten -> dense(3) as fc
}
"""
STATE = ("running_mean", "running_var")


def model(text: str, threads: int = 1, seed: int = 0, fuse: bool = True) -> Model:
    manifest, obj = _compiled(text, False, fuse)
    return Model(copy.deepcopy(manifest), obj, seed=seed, threads=threads)


def randomize(m: Model, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, v in m.params.items():
        v[...] = rng.standard_normal(v.shape) * 0.5 + (1.0 if name.startswith("bn") and "weight" in name else 0.0)
    for name, v in m.buffers.items():
        v[...] = rng.random(v.shape) + 0.5 if name.endswith("var") else rng.standard_normal(v.shape)


def batch(m: Model, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *m.input_shape)).astype(np.float32) * 2 + 1
    return x, rng.integers(0, m.output_shape[0], n)


def everything(m: Model) -> dict[str, np.ndarray]:
    return {**m.params, **m.buffers}


def assert_same_step(one: tuple, two: tuple, buffers1: dict, buffers2: dict) -> None:
    """Two (loss, gradients) and the running statistics after them: equal bit for bit."""
    assert one[0] == two[0]
    for name in one[1]:
        np.testing.assert_array_equal(one[1][name], two[1][name])
    for name in buffers1:
        np.testing.assert_array_equal(buffers1[name], buffers2[name])


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    """Relative to the largest magnitude of `want`: a batchnorm's input bias has a gradient of exactly 0."""
    scale = max(np.abs(want).max(), 1e-3)
    assert np.abs(got - want).max() <= rtol * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("text", [MAPS, VECTORS])
def test_inference_uses_the_running_statistics_folded_or_not(text, fuse):
    m = model(text, fuse=fuse)
    randomize(m)
    x, _ = batch(m, 11)
    want = reference_forward(graph(text), everything(m), x)
    assert_close(m(x), want, 1e-5)
    assert_close(m(x[:1]), want[:1], 1e-5)  # one image: the same folded weights


@pytest.mark.parametrize("text", [MAPS, VECTORS, RESIDUAL])
@pytest.mark.parametrize("n,fuse", [(3, True), (9, True), (70, True), (9, False)])
def test_training_gradients_go_through_the_batch_statistics(text, n, fuse):
    m = model(text, fuse=fuse)
    randomize(m)
    x, y = batch(m, n)
    want_loss, want = reference_value_and_grad(graph(text), everything(m), x, y)
    loss, grads = m.value_and_grad(x, y)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name in m.params:
        assert_close(grads[name], want[name], 1e-4)


@pytest.mark.parametrize("text", [MAPS, VECTORS, RESIDUAL])
def test_a_step_gives_the_same_bits_on_one_and_two_threads(text):
    results = []
    for threads in (1, 2):
        m = model(text, threads=threads)
        randomize(m)
        x, y = batch(m, 300)  # more than a native chunk: the statistics still cover the whole batch
        loss, grads = m.value_and_grad(x, y)
        results.append((loss, grads, {k: v.copy() for k, v in m.buffers.items()}, m(x)))
    (l1, g1, b1, y1), (l2, g2, b2, y2) = results
    assert_same_step((l1, g1), (l2, g2), b1, b2)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("text", [MAPS, VECTORS, RESIDUAL])
def test_native_reductions_give_the_bits_of_the_reductions_in_python(text, threads):
    """A step in one native call per thread (cnnc.codegen.bnphases) against the phases called one by one with
    ``Statistics`` reducing in numpy between them: the same loss, gradients and running statistics, bit for bit."""
    results = []
    for native in (True, False):
        m = model(text, threads=threads)
        assert m._phased_steps  # (the code has the native step)
        if not native:
            m._phased_steps = {}
        randomize(m)
        x, y = batch(m, 100)
        steps = [m.value_and_grad(x, y) for _ in range(2)]  # (the second normalizes with moved statistics too)
        results.append((steps, {k: v.copy() for k, v in m.buffers.items()}, m.statistics.coefs.copy()))
    (s1, b1, c1), (s2, b2, c2) = results
    for one, two in zip(s1, s2):
        assert_same_step(one, two, b1, b2)
    np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_preparation_that_raises_leaves_the_state_alone_and_no_thread_waiting(threads):
    """The native step's threads meet at a barrier before their first phase: when one thread's preparation
    raises, every thread returns there, the running statistics are untouched, and the error reaches the caller."""
    m = model(MAPS, threads=threads)
    randomize(m)
    x, y = batch(m, 64)
    targets = m.check_targets(y, len(x), "cross_entropy")
    before = {k: v.copy() for k, v in m.buffers.items()}

    def prepare(t: int, a: int, b: int) -> None:
        if t == threads - 1:
            raise RuntimeError("no batch today")

    with pytest.raises(RuntimeError, match="no batch today"):
        m.gradients(x.copy(), targets, "cross_entropy", prepare=prepare)
    for name, value in before.items():
        np.testing.assert_array_equal(m.buffers[name], value)
    loss, _ = m.value_and_grad(x, y)  # (and the next step runs)
    assert np.isfinite(loss)


def test_the_running_statistics_move_by_momentum_with_the_unbiased_variance():
    m = model(MAPS)
    randomize(m)
    x, y = batch(m, 6)
    g = graph(MAPS)
    before = everything(m)
    values = {k: np.asarray(v, dtype=np.float64).copy() for k, v in before.items()}
    from cnnc.reference import forward_values

    vals = forward_values(g, values, x, training=True)
    m.value_and_grad(x, y)
    for bn in ("bn1", "bn2", "bn3", "bn4"):
        node = g.nodes[bn]
        inp = vals[node["inputs"][0]]
        axes = (0, *range(2, inp.ndim))
        count = inp.size // inp.shape[1]
        mom = node["args"]["momentum"]
        want_mean = (1 - mom) * values[f"{bn}.running_mean"] + mom * inp.mean(axis=axes)
        want_var = (1 - mom) * values[f"{bn}.running_var"] + mom * inp.var(axis=axes) * count / (count - 1)
        np.testing.assert_allclose(m.buffers[f"{bn}.running_mean"], want_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.buffers[f"{bn}.running_var"], want_var, rtol=1e-4, atol=1e-5)
    assert m.batches_tracked == 1


def test_state_is_not_a_parameter_and_is_not_decayed():
    m = model(MAPS)
    assert set(m.buffers) == {f"bn{i}.{k}" for i in range(1, 5) for k in STATE}
    assert not set(m.buffers) & set(m.params)
    assert all((m.buffers[f"bn1.{k}"] == v).all() for k, v in (("running_mean", 0.0), ("running_var", 1.0)))
    assert (m.params["bn1.weight"] == 1.0).all() and (m.params["bn1.bias"] == 0.0).all()
    decayed = {p["name"] for p in m.manifest["params"] if p["decay"]}
    assert decayed == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    m.buffers["bn2.running_var"] = np.full(4, 2.0)
    assert (m.buffers["bn2.running_var"] == 2.0).all()
    with pytest.raises(ValueError, match="negative variances"):
        m.buffers["bn2.running_var"] = np.full(4, -1.0)
    with pytest.raises(ValueError, match="has no buffer 'bn9.running_mean'"):
        m.buffers["bn9.running_mean"] = np.zeros(4)


def test_a_saved_file_holds_pytorchs_state_dict_names_and_loads_back(tmp_path):
    m = model(MAPS)
    randomize(m)
    x, y = batch(m, 5)
    m.value_and_grad(x, y)
    m.save(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as f:
        names = set(f.files)
        assert f["bn1.num_batches_tracked"].dtype == np.int64 and int(f["bn1.num_batches_tracked"]) == 1
    assert names == set(m.params) | set(m.buffers) | {f"bn{i}.num_batches_tracked" for i in range(1, 5)}
    other = model(MAPS, seed=3)
    other.load(tmp_path / "w.npz")
    np.testing.assert_array_equal(other(x), m(x))
    assert other.batches_tracked == 1
    with np.load(tmp_path / "w.npz") as f:
        partial = {k: f[k] for k in f.files if not k.startswith("bn2.running")}
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(ValueError, match="missing bn2.running_mean, bn2.running_var"):
        other.load(tmp_path / "partial.npz")


def test_an_artifact_carries_the_running_statistics(tmp_path):
    m = model(MAPS)
    randomize(m)
    x, _ = batch(m, 4)
    m.save_artifact(tmp_path / "net.cnnc")
    again = load(tmp_path / "net.cnnc")
    for name, v in m.buffers.items():
        np.testing.assert_array_equal(again.buffers[name], v)
    np.testing.assert_array_equal(again(x), m(x))


def test_one_value_per_channel_cannot_train():
    m = model(VECTORS)
    x, y = batch(m, 1)
    with pytest.raises(ValueError, match="batchnorm bn0 needs more than one value per channel"):
        m.value_and_grad(x, y)


def test_across_ranks_the_rule_counts_the_whole_batch_not_this_ranks_part():
    """Under MPI (``RankReducer``) a rank's part of a batch of 3 may be one image: the statistics cover all 3."""
    m = model(VECTORS)
    x, y = batch(m, 1)
    targets = m.check_targets(y, 1, "cross_entropy")
    m.statistics.reducer = RankReducer(Local())
    assert np.isfinite(m.gradients(x, targets, "cross_entropy", image0=2, whole=3))
    with pytest.raises(ValueError, match="batchnorm bn0 needs more than one value per channel"):
        m.gradients(x, targets, "cross_entropy")


@pytest.mark.parametrize("text", [MAPS, RESIDUAL], ids=["maps", "residual"])
def test_gradcheck_passes_on_a_network_with_batchnorm(text):
    """Biases before a batchnorm have a zero gradient in theory: float32 noise of the network's gradient scale."""
    from cnnc.gradcheck import gradcheck

    native, ref, rows = gradcheck(graph(text), batch=6, samples=4)
    assert native == pytest.approx(ref, rel=1e-5)
    assert max(r.max_rel for r in rows) < 1e-2


# ---- the training loop ---------------------------------------------------------------------------------------

MLP_BN = """
network mlpbn {
    input x: 8
    h = x -> dense(16) as fc1 -> batchnorm as bn1 -> relu
    y = h -> dense(3) as fc2
}
"""
FIT = dict(batch=24, optimizer="momentum", lr=0.05, validation=0.2, seed=7, progress=False)


def test_fit_keeps_the_best_epochs_running_statistics_with_its_weights():
    """Early stopping restores the best epoch's parameters and the running statistics of that same epoch."""
    x, y = blobs(240, seed=4)
    m = model(MLP_BN)
    seen = []
    h = m.fit(x, y, epochs=8, patience=2, lr=0.8, batch=24, validation=0.3, seed=3, progress=False,
              on_epoch=lambda e: seen.append((m.flat_params.copy(), {k: v.copy() for k, v in m.buffers.items()})))
    assert h.best_epoch < len(h.epochs)  # (else this test would show nothing)
    params, buffers = seen[h.best_epoch - 1]
    np.testing.assert_array_equal(m.flat_params, params)
    for name, v in buffers.items():
        np.testing.assert_array_equal(m.buffers[name], v)
    assert not np.array_equal(seen[-1][1]["bn1.running_mean"], buffers["bn1.running_mean"])


def test_resume_with_batchnorm_equals_an_unbroken_run(tmp_path):
    x, y = blobs(200, seed=4)
    whole = model(MLP_BN)
    whole.fit(x, y, epochs=3, **FIT)
    part = model(MLP_BN)
    part.fit(x, y, epochs=1, checkpoint=tmp_path / "c", **FIT)
    fresh = model(MLP_BN, seed=5)
    fresh.fit(x, y, epochs=3, resume=tmp_path / "c", **FIT)
    np.testing.assert_array_equal(fresh.flat_params, whole.flat_params)
    np.testing.assert_array_equal(fresh.flat_state, whole.flat_state)
    assert fresh.batches_tracked == whole.batches_tracked == 3 * 7  # 160 training images in batches of 24


def test_weight_decay_never_touches_batchnorm():
    """The penalty the training loop adds: 2 lambda w on conv and dense weights; none on biases or batchnorm."""
    m = model(MLP_BN)
    randomize(m)
    grads = np.zeros_like(m.flat_params)
    add_weight_decay(m.flat_params, grads, m.decay_mask, 0.5)
    for p in m.manifest["params"]:
        got = grads[p["offset"]:p["offset"] + p["size"]]
        want = m.params[p["name"]].reshape(-1) if p["name"] in ("fc1.weight", "fc2.weight") else 0.0
        np.testing.assert_array_equal(got, want, err_msg=p["name"])


# conv variants that fold: grouped, dilated, a connection table, one covering its whole input (run as dense)
CONVS = """
table pairs {
    0: 0 1
    1: 2 3
    2: 0 3
    3: 1 2
}
network bnconvs {
    input image: 4x9x9
    g = image -> conv(6, 3x3, groups=2, pad=1) as grouped -> batchnorm as bn_g -> relu
    d = g -> conv(4, 3x3, dilation=2, pad=2) as dilated -> batchnorm as bn_d -> elu
    t = d -> conv(4, 3x3, connect=pairs, bias=false) as tabled -> batchnorm as bn_t -> relu
    w = t -> conv(5, 7x7) as whole -> batchnorm as bn_w
    logits = w -> flatten -> dense(3)
}
"""


def test_folding_into_every_kind_of_conv():
    m = model(CONVS)
    randomize(m)
    x, y = batch(m, 10)
    assert_close(m(x), reference_forward(graph(CONVS), everything(m), x), 1e-5)
    want_loss, want = reference_value_and_grad(graph(CONVS), everything(m), x, y)
    loss, grads = m.value_and_grad(x, y)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name in m.params:
        assert_close(grads[name], want[name], 1e-4)


BAD_BATCHNORM = [
    ("batchnorm.state_floats", 0, "batchnorm.state_floats"),
    ("batchnorm.state.0.kind", "running_max", "batchnorm.state[0].kind"),
    ("batchnorm.state.0.offset", 10**6, "batchnorm.state[0].offset"),
    ("batchnorm.state.0.init", "twos", "batchnorm.state[0].init"),
    ("batchnorm.inference_params.0.size", 3, "batchnorm.inference_params[0].size"),
    ("batchnorm.layers.0.stats", 10**6, "batchnorm.layers[0].stats"),
    ("batchnorm.layers.0.coefs.cx", 10**6, "batchnorm.layers[0].coefs.cx"),
    ("batchnorm.layers.0.eps", 0, "batchnorm.layers[0].eps"),
    ("batchnorm.layers.0.momentum", 2, "batchnorm.layers[0].momentum"),
    ("batchnorm.phases.mse.0", {"kind": "sideways", "layer": "bn1"}, "batchnorm.phases.mse[0]"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_BATCHNORM, ids=[f for f, _, _ in BAD_BATCHNORM])
def test_a_hand_edited_batchnorm_manifest_names_the_bad_field(tmp_path, field, value, named):
    from tests.runtime.test_artifact import _edit, _tampered

    m = model(MAPS)
    m.save_artifact(tmp_path / "net.cnnc")
    bad = _tampered((m, tmp_path / "net.cnnc", None), tmp_path, _edit(field, value))
    with pytest.raises(ValueError, match="^" + re.escape(f"{bad}: manifest field '{named}'")):
        load(bad)


PESTER = """
import os, random, signal, sys, threading, time
sys.path.insert(0, {root!r})
from tests.runtime.test_batchnorm import RESIDUAL, batch, model, randomize
m = model(RESIDUAL, threads=2)
randomize(m)
x, y = batch(m, 64)
stop = False

def pester():
    while not stop:
        time.sleep(random.uniform(0.0005, 0.01))
        os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=pester, daemon=True).start()
t0 = time.time()
while time.time() - t0 < 20:
    try:
        m.value_and_grad(x, y)
    except KeyboardInterrupt:
        pass
signal.signal(signal.SIGINT, signal.SIG_IGN)
stop = True
print("finite", m.value_and_grad(x, y)[0])
"""


@pytest.mark.slow
def test_ctrl_c_pressed_again_and_again_during_native_steps_never_hangs(tmp_path):
    """Ctrl-C hundreds of times a second on a two-thread step with batchnorm (one native call per thread, meeting
    at barriers): each KeyboardInterrupt reaches the caller after the step, and the model trains on. (Before, an
    interrupt between the calling thread's preparation and its native call left the worker at a barrier for ever:
    hung within 20 s in 2 runs of 2.)"""
    script = tmp_path / "pester.py"
    script.write_text(PESTER.format(root=str(Path(__file__).resolve().parents[2])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.isfinite(float(done.stdout.split()[-1]))
