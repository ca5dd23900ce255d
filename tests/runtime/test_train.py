"""The training loop (``cnnc_runtime.train.fit``): history, optimizers, weight decay, early stopping,
restarts, jitter, dropout, NaN stops, step limits, lr decay, checkpoints and resuming, seeds, validation.

Tiny networks on synthetic, separable data: every fit here takes milliseconds.
The native training step is observed by wrapping ``model.gradients``
(it receives the batch exactly as the native code will see it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnc_runtime import optimizers
from cnnc_runtime import train as train_mod
from cnnc_runtime.inputs import prepare_images
from cnnc_runtime.model import Model
from cnnc_runtime.train import Epoch, History, TrainingStopped, evaluate
from tests.reference import PADDED, build

MLP = """
network tiny {
    input x: 8
    h = x -> dense(16) -> relu
    y = h -> dense(3)
}
"""

MLP_DROPOUT = """
network tinydrop {
    input x: 8
    h = x -> dense(16) -> relu -> dropout(0.25)
    y = h -> dense(3)
}
"""

CONV = """
network tinyconv {
    input image: 1x6x6
    c = image -> conv(3, 3x3) -> relu -> maxpool(2x2)
    y = c -> flatten -> dense(2)
}
"""

DROPOUT_ONLY = """
network droponly {
    input x: 1000
    y = x -> dropout(0.3)
}
"""


def blobs(n: int = 300, seed: int = 0, classes: int = 3, features: int = 8, spread: float = 0.6):
    """Gaussian clusters around well separated centres: (x float32 (n, features), y int64 (n,))."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((classes, features)) * 2.0
    y = rng.integers(0, classes, n)
    x = centres[y] + rng.standard_normal((n, features)) * spread
    return x.astype(np.float32), y.astype(np.int64)


def stripes(n: int = 200, seed: int = 0):
    """1x6x6 images: class 0 is bright on the left half, class 1 on the right half, plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, 1, 6, 6)) * 0.3
    x[y == 0, :, :, :3] += 1.0
    x[y == 1, :, :, 3:] += 1.0
    return x.astype(np.float32), y.astype(np.int64)


def spy_steps(model, call_native: bool = True) -> list[dict]:
    """Record every training step's inputs (and outputs) by wrapping ``model.gradients`` (so on the per-step path:
    a native run of steps would not call it)."""
    model.native_runs = False
    calls: list[dict] = []
    original = model.gradients

    def spy(x, targets, loss, *, seed=0, out=None, losses=None, prepare=None, label_smoothing=0.0, image0=0,
            whole=None):
        params = model.flat_params.copy()
        threads: set[int] = set()

        def prepared(t: int, a: int, b: int) -> None:  # (fit has the batch filled where the native step runs)
            threads.add(t)
            prepare(t, a, b)

        if call_native:
            value = original(x, targets, loss, seed=seed, out=out, losses=losses,
                             prepare=prepared if prepare else None, label_smoothing=label_smoothing,
                             image0=image0, whole=whole)
        else:
            if prepare is not None:
                prepared(0, 0, len(x))
            out[...] = 0.0
            losses[...] = 0.0
            value = 0.0
        calls.append({"x": x.copy(), "targets": targets.copy(), "seed": seed, "out": out.copy(),
                      "losses": losses.copy(), "params": params, "threads": threads})
        return value

    model.gradients = spy
    return calls


@pytest.fixture(scope="module")
def data():
    return blobs()


# ---- the History -------------------------------------------------------------------------------


def test_fit_returns_a_history_of_every_epoch(data):
    x, y = data
    model = build(MLP)
    h = model.fit(x, y, epochs=4, batch=32, optimizer="adam", lr=0.01, validation=0.2, progress=False)
    assert isinstance(h, History)
    assert [e.epoch for e in h.epochs] == [1, 2, 3, 4]
    assert all(isinstance(e, Epoch) for e in h.epochs)
    steps_per_epoch = math.ceil(240 / 32)
    for e in h.epochs:
        assert math.isfinite(e.loss) and e.loss > 0
        assert 0 <= e.accuracy <= 1 and 0 <= e.val_accuracy <= 1
        assert math.isfinite(e.val_loss) and e.val_loss > 0
        assert e.seconds > 0
        assert e.images_per_second == pytest.approx(240 / e.seconds)
        assert e.steps == e.epoch * steps_per_epoch
        assert e.restart == 0
    assert h.stopped == "completed 4 epochs"
    assert len(h.restarts) == 1 and h.restarts[0]["epochs"] == 4
    d = h.as_dict()
    assert History.from_dict(d) == h
    assert set(d["epochs"][0]) >= {"loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second"}


def test_without_validation_the_val_fields_are_none(data):
    x, y = data
    h = build(MLP).fit(x, y, epochs=1, batch=64, progress=False)
    assert h.epochs[0].val_loss is None and h.epochs[0].val_accuracy is None
    assert h.epochs[0].accuracy is not None


def test_loss_decreases_and_the_data_is_learnt(data):
    x, y = data
    model = build(MLP)
    h = model.fit(x, y, epochs=8, batch=32, optimizer="adam", lr=0.01, progress=False)
    losses = [e.loss for e in h.epochs]
    assert losses[-1] < 0.3 * losses[0], losses
    assert h.epochs[-1].accuracy >= 0.95
    loss, acc = model.evaluate(x, y)
    assert acc >= 0.95 and loss < losses[0]


@pytest.mark.parametrize("name, lr, extra", [
    ("sgd", 0.1, {}),
    ("momentum", 0.05, {"optimizer_args": {"beta": 0.9}}),
    ("rmsprop", 0.01, {}),
    ("adam", 0.01, {}),
])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_every_optimizer_trains(name, lr, extra, net):
    if net == "mlp":
        model, (x, y) = build(MLP), blobs(200, seed=3)
    else:
        model, (x, y) = build(CONV), stripes(200, seed=3)
    before, _ = model.evaluate(x, y)
    h = model.fit(x, y, epochs=6, batch=20, optimizer=name, lr=lr, progress=False, **extra)
    after, acc = model.evaluate(x, y)
    assert h.epochs[-1].loss < h.epochs[0].loss
    assert after < 0.5 * before, (before, after)
    assert acc >= 0.9


def test_an_optimizer_object_is_used_as_given(data):
    x, y = data
    opt = optimizers.Momentum(lr=0.05, beta=0.5)
    model = build(MLP)
    model.fit(x, y, epochs=2, batch=50, optimizer=opt, progress=False)
    assert opt.t == 2 * 6  # ceil(300 / 50) steps per epoch, taken by this very object
    assert opt.beta == 0.5


MLP_MOMENTUM = MLP + """
train {
    optimizer momentum(lr=0.02, beta=0.8)
}
"""


def optimizer_used(model, **settings) -> optimizers.Optimizer:
    """The optimizer `fit` builds from the train section and `settings` (caught as it binds its native update)."""
    seen = []
    original = model.native_update
    model.native_update = lambda opt: (seen.append(opt), original(opt))[1]
    x, y = blobs(40)
    model.fit(x, y, epochs=1, batch=40, progress=False, **settings)
    return seen[0]


@pytest.mark.parametrize("settings, kind, hyper", [
    ({}, optimizers.Momentum, {"lr": 0.02, "beta": 0.8}),
    ({"optimizer": "adam"}, optimizers.Adam, {"lr": 0.02, "beta1": 0.9}),  # lr carries over, beta does not
    ({"optimizer": "rmsprop"}, optimizers.RMSProp, {"lr": 0.02, "beta": 0.9}),  # rmsprop's own default beta
    ({"optimizer": "adam", "lr": 0.001}, optimizers.Adam, {"lr": 0.001}),
    ({"optimizer": "adam", "optimizer_args": {"beta1": 0.5}}, optimizers.Adam, {"beta1": 0.5}),
    ({"momentum": 0.5}, optimizers.Momentum, {"lr": 0.02, "beta": 0.5}),
    ({"optimizer": "sgd", "momentum": 0.7}, optimizers.Momentum, {"lr": 0.02, "beta": 0.7}),
    ({"optimizer": "sgd"}, optimizers.SGD, {"lr": 0.02}),
])
def test_an_overridden_optimizer_keeps_only_the_arguments_it_takes(settings, kind, hyper):
    opt = optimizer_used(build(MLP_MOMENTUM), **settings)
    assert type(opt) is kind
    assert {k: getattr(opt, k) for k in hyper} == pytest.approx(hyper)


def test_momentum_chooses_momentum_when_nothing_names_the_optimizer():
    """As `cnnc train --momentum 0.9` on a file without an optimizer: sgd with momentum, not an error about adam."""
    opt = optimizer_used(build(MLP), momentum=0.9)
    assert type(opt) is optimizers.Momentum and opt.beta == pytest.approx(0.9)


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "adam", "optimizer_args": {"beta": 0.9}},
     "optimizer adam takes lr, beta1, beta2, eps; optimizer_args has beta"),
    ({"optimizer": "sgd", "optimizer_args": {"eps": 1e-8}}, "optimizer sgd takes lr; optimizer_args has eps"),
    ({"optimizer": "adam", "momentum": 0.9},
     "momentum 0.9 is the beta of sgd with momentum, but the optimizer is adam"),
    ({"optimizer": "rmsprop", "momentum": 0.9}, "the beta of sgd with momentum, but the optimizer is rmsprop"),
    ({"optimizer": "momentum", "momentum": 1.5}, r"momentum beta must be in \[0, 1\), got 1.5"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ({"optimizer": optimizers.SGD(0.1), "momentum": 0.9}, "apply to an optimizer given by name"),
])
def test_optimizer_arguments_it_does_not_take_are_refused(settings, message):
    model = build(MLP_MOMENTUM)
    x, y = blobs(40)
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, epochs=1, progress=False, **settings)


# ---- weight decay --------------------------------------------------------------------------------


def test_weight_decay_one_sgd_step_by_hand(data):
    """One full-batch SGD step: w <- w - lr (g + 2 lambda w) for weights, b <- b - lr g for biases."""
    x, y = data
    lam, lr = 0.05, 0.1
    model = build(MLP)
    model.initialize(0)  # fit initialises from seed + restart = 0
    for name in ("h.bias", "y.bias"):  # non-zero biases show that decay leaves them alone
        model.params[name][...] = 0.5
    start = model.state()
    loss0, grads = model.value_and_grad(x, y)

    model.initialize = lambda seed=0: None  # keep the biases above: fit would re-initialise
    h = model.fit(x, y, epochs=1, batch=len(x), optimizer="sgd", lr=lr, weight_decay=lam, progress=False)
    penalty = sum(float((start[k].astype(np.float64) ** 2).sum()) for k in start if k.endswith(".weight"))
    assert h.epochs[0].loss == pytest.approx(loss0 + lam * penalty, rel=1e-5)
    for k, w in start.items():
        if k.endswith(".weight"):
            want = w - lr * (grads[k] + 2 * lam * w)
        else:
            want = w - lr * grads[k]
        np.testing.assert_allclose(model.params[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
    # the biases moved by the gradient only: not towards zero by 2 lr lambda b
    for k in ("h.bias", "y.bias"):
        np.testing.assert_allclose(model.params[k], start[k] - lr * grads[k], rtol=1e-5, atol=1e-7)
        assert not np.allclose(model.params[k], start[k] - lr * (grads[k] + 2 * lam * start[k]), atol=1e-4)


def test_weight_decay_shrinks_the_weights(data):
    x, y = data

    def weight_norm(lam):
        model = build(MLP)
        model.fit(x, y, epochs=5, batch=32, optimizer="sgd", lr=0.05, weight_decay=lam, progress=False)
        return sum(float((model.params[k] ** 2).sum()) for k in model.params if k.endswith(".weight"))

    none, some, lots = weight_norm(0.0), weight_norm(0.01), weight_norm(0.1)
    assert lots < some < none
    assert lots < 0.7 * none


FROZEN = """
table pairs {
    0: 0 1
    1: 2
}
network frozen {
    input image: 3x7x7
    t = image -> conv(2, 3x3, connect=pairs) -> relu
    f = t -> conv(2, 3x3, groups=2, bias=false,
                  weights=[[[[1, 2, 1], [0, 0, 0], [-1, -2, -1]]], [[[1, 0, -1], [2, 0, -2], [1, 0, -1]]]])
    y = f -> flatten -> dense(2)
}
"""


def test_frozen_and_unconnected_weights_stay_put_under_decay():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3, 7, 7)).astype(np.float32)
    targets = rng.integers(0, 2, 40)
    model = build(FROZEN)
    start = model.state()
    model.initialize = lambda seed=0: None
    model.fit(x, targets, epochs=2, batch=10, optimizer="adam", lr=0.05, weight_decay=0.5,
              progress=False)
    np.testing.assert_array_equal(model.params["f.weight"], start["f.weight"])
    w = model.params["t.weight"]
    assert (w[0, 2] == 0).all() and (w[1, :2] == 0).all()
    assert not np.array_equal(w, start["t.weight"])


def test_weight_decay_does_not_touch_biases_without_gradient():
    """Biases of a network whose loss does not depend on them (zero gradient) stay put under decay."""
    x, y = blobs(64)
    model = build(MLP)
    model.initialize(0)
    model.params["h.weight"][...] = 0.0  # relu(0 + b) with b < 0 is 0: h.bias has no gradient
    model.params["h.bias"][...] = -1.0
    model.initialize = lambda seed=0: None
    model.fit(x, y, epochs=2, batch=16, optimizer="sgd", lr=0.1, weight_decay=0.5, progress=False)
    np.testing.assert_array_equal(model.params["h.bias"], -1.0)


# ---- early stopping ----------------------------------------------------------------------------


def test_early_stopping_restores_the_best_weights():
    # random labels: nothing to learn, so the validation loss soon rises while the network memorises
    rng = np.random.default_rng(5)
    x = rng.standard_normal((120, 8)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    xv = rng.standard_normal((60, 8)).astype(np.float32)
    yv = rng.integers(0, 3, 60)
    model = build(MLP)
    patience = 2
    h = model.fit(x, y, validation_data=(xv, yv), epochs=60, batch=8, optimizer="adam", lr=0.03,
                  patience=patience, progress=False)
    assert h.stopped.startswith("early stop"), h.stopped
    assert len(h.epochs) < 60
    vals = [e.val_loss for e in h.epochs]
    best = int(np.argmin(vals)) + 1
    assert h.best_epoch == best
    assert len(h.epochs) == best + patience  # stopped after `patience` epochs without improvement
    assert min(vals[best:]) >= vals[best - 1]
    # the model holds the best epoch's weights: its validation loss is exactly the best one
    val_loss, _ = model.evaluate(xv, yv)
    assert val_loss == pytest.approx(vals[best - 1], rel=1e-12, abs=1e-12)
    assert h.restarts[0]["loss"] == h.epochs[best - 1].loss


def test_early_stopping_min_delta():
    x, y = blobs(200, seed=2)
    h = build(MLP).fit(x, y, epochs=30, batch=20, optimizer="adam", lr=0.01, patience=1, min_delta=10.0,
                       progress=False)
    # no epoch improves on the first by 10: stop after epoch 2, keep epoch 1
    assert len(h.epochs) == 2 and h.best_epoch == 1
    assert "early stop" in h.stopped


def test_patience_none_switches_off_the_train_sections_early_stop():
    x, y = blobs(200, seed=2)
    text = MLP.replace("network tiny", "network tinystop") + "train {\n    early_stop(patience=1, min_delta=10.0)\n}\n"
    stopped = build(text).fit(x, y, epochs=4, batch=20, optimizer="adam", lr=0.01, progress=False)
    assert len(stopped.epochs) == 2 and stopped.best_epoch == 1  # the file's early stop
    free = build(text).fit(x, y, epochs=4, batch=20, optimizer="adam", lr=0.01, patience=None, progress=False)
    plain = build(MLP).fit(x, y, epochs=4, batch=20, optimizer="adam", lr=0.01, progress=False)
    assert free.stopped == plain.stopped == "completed 4 epochs"
    assert [e.loss for e in free.epochs] == [e.loss for e in plain.epochs]


def test_old_setting_names_still_work_with_a_deprecation_warning():
    x, y = blobs(200, seed=2)
    with pytest.warns(DeprecationWarning, match="batch_size is now called batch"):
        old = build(MLP).fit(x, y, epochs=2, batch_size=20, validation=0.1, progress=False)
    with pytest.warns(DeprecationWarning, match="validation_split is now called validation"):
        build(MLP).fit(x, y, epochs=1, batch=20, validation_split=0.1, progress=False)
    new = build(MLP).fit(x, y, epochs=2, batch=20, validation=0.1, progress=False)
    assert [e.loss for e in old.epochs] == [e.loss for e in new.epochs]
    with pytest.raises(TypeError, match="batch_size and batch are the same setting"):
        build(MLP).fit(x, y, batch=20, batch_size=20, progress=False)


def test_early_stopping_on_training_loss_without_validation(data):
    x, y = data
    h = build(MLP).fit(x, y, epochs=5, batch=32, optimizer="adam", lr=0.01, patience=2, progress=False)
    assert h.best_epoch == int(np.argmin([e.loss for e in h.epochs])) + 1


# ---- restarts ------------------------------------------------------------------------------------


def test_restarts_keep_the_lowest_training_loss(data):
    x, y = data
    model = build(MLP)
    snapshots: dict[int, np.ndarray] = {}
    records: list[Epoch] = []

    def on_epoch(e):
        records.append(e)
        snapshots[e.restart] = model.flat_params.copy()

    h = model.fit(x, y, epochs=2, batch=64, optimizer="sgd", lr=0.02, restarts=3, seed=10,
                  on_epoch=on_epoch, progress=False)
    assert [r["restart"] for r in h.restarts] == [0, 1, 2]
    assert [r["seed"] for r in h.restarts] == [10, 11, 12]
    assert all(r["epochs"] == 2 for r in h.restarts)
    losses = [r["loss"] for r in h.restarts]
    assert len(set(losses)) == 3, "different initialisations give different runs"
    best = int(np.argmin(losses))
    assert [e.restart for e in h.epochs] == [best, best]
    assert h.epochs == [e for e in records if e.restart == best]
    np.testing.assert_array_equal(model.flat_params, snapshots[best])
    # each restart's loss is its best epoch's training loss
    for r in h.restarts:
        mine = [e.loss for e in records if e.restart == r["restart"]]
        assert r["loss"] == min(mine)


def test_restarts_start_from_the_models_weights_then_from_derived_seeds(data):
    x, y = data
    model = build(MLP)
    own = model.flat_params.copy()
    starts = []
    original = model.initialize

    def initialize(seed=0):
        original(seed)
        starts.append((seed, model.flat_params.copy()))

    model.initialize = initialize
    calls = spy_steps(model)
    model.fit(x, y, epochs=1, batch=100, restarts=3, seed=4, progress=False)
    assert [s for s, _ in starts] == [5, 6]  # restart k > 0 re-draws the weights from seed + k
    np.testing.assert_array_equal(calls[0]["params"], own)  # restart 0: the weights the model had
    assert not np.array_equal(starts[0][1], starts[1][1])
    assert not np.array_equal(own, starts[0][1])


def test_fit_trains_the_weights_the_model_has(data):
    x, y = data
    model = build(MLP)
    model.flat_params[...] = 7.0
    model.fit(x, y, epochs=1, batch=100, optimizer="sgd", lr=1e-9, progress=False)
    np.testing.assert_allclose(model.flat_params, 7.0, rtol=1e-6)


def test_fitting_twice_continues_from_the_first_fit(data):
    x, y = data
    once, twice = build(MLP), build(MLP)
    once.fit(x, y, epochs=2, batch=50, optimizer="sgd", lr=0.05, progress=False)
    twice.fit(x, y, epochs=1, batch=50, optimizer="sgd", lr=0.05, progress=False)
    after_one = twice.flat_params.copy()
    twice.fit(x, y, epochs=1, batch=50, optimizer="sgd", lr=0.05, progress=False)
    assert not np.array_equal(twice.flat_params, after_one)
    assert twice.evaluate(x, y)[0] < build(MLP).evaluate(x, y)[0]


# ---- jitter and dropout --------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_jitter_adds_gaussian_noise_of_sigma(sigma):
    n, f = 400, 8
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None] * 100.0, f, axis=1)  # row i is all 100 i
    y = np.zeros(n, np.int64)
    model = build(MLP)
    calls = spy_steps(model, call_native=False)
    before = x.copy()
    model.fit(x, y, epochs=2, batch=50, jitter=sigma, progress=False)
    np.testing.assert_array_equal(x, before)  # the caller's array is not touched
    noise = []
    for c in calls:
        xb = c["x"]
        idx = np.rint(xb.mean(axis=1) / 100.0).astype(int)  # which image each row is
        noise.append(xb - x[idx])
    noise = np.concatenate(noise)
    assert noise.shape == (2 * n, f)
    assert abs(noise.mean()) < 0.05 * sigma
    assert noise.std() == pytest.approx(sigma, rel=0.03)
    # fresh noise at every step: the same image gets different noise in the two epochs
    first = np.concatenate([c["x"] for c in calls[:8]])
    second = np.concatenate([c["x"] for c in calls[8:]])
    first = first[np.argsort(first.mean(axis=1))]
    second = second[np.argsort(second.mean(axis=1))]
    assert not np.allclose(first, second)


def test_each_thread_prepares_its_share_of_the_batch_as_one_thread_would(data):
    """fit gathers and jitters each thread's images on that thread: the batches are those of a 1-thread model."""
    x, y = data
    split = build(MLP)
    if split.threads < 2:
        pytest.skip("one core: nothing is split")
    whole = Model(split.manifest, split._obj, threads=1)
    seen = {name: spy_steps(m) for name, m in (("split", split), ("whole", whole))}
    for m in (split, whole):
        m.fit(x, y, epochs=2, batch=32, jitter=0.1, seed=5, progress=False)
    assert len(seen["split"]) == len(seen["whole"]) > 4
    for a, b in zip(seen["split"], seen["whole"]):
        np.testing.assert_array_equal(a["x"], b["x"])
        assert a["threads"] <= set(range(split.threads)) and b["threads"] == {0}
    # a batch of 32 is two shards of 16 (a smaller last batch may be one): both threads took part
    assert any(a["threads"] == set(range(split.threads)) for a in seen["split"])


def test_a_batch_that_fails_leaves_no_partial_gradient_behind(data):
    """The main thread's share fails after a worker has summed its own: the next gradient is still exact."""
    x, y = data
    model = build(MLP)
    if model.threads < 2:
        pytest.skip("one core: nothing runs beside the main thread")
    loss = model.loss_name(None)
    xb, targets = model.prepare(x[:32]), model.check_targets(y[:32], 32, loss)

    def prepare(t: int, a: int, b: int) -> None:
        if t == 0:
            raise OSError("the data went away")

    with pytest.raises(OSError, match="went away"):
        model.gradients(xb, targets, loss, prepare=prepare)
    _, grads = model.value_and_grad(x[:32], y[:32])
    _, want = build(MLP).value_and_grad(x[:32], y[:32])
    for name in want:
        np.testing.assert_array_equal(grads[name], want[name])


def test_no_jitter_means_the_exact_images(data):
    x, y = data
    model = build(MLP)
    calls = spy_steps(model, call_native=False)
    model.fit(x, y, epochs=1, batch=64, progress=False)
    seen = np.concatenate([c["x"] for c in calls])
    assert len(seen) == len(x)
    # every image once per epoch, exactly, in a shuffled order
    order = np.lexsort(seen.T[::-1])
    np.testing.assert_array_equal(seen[order], x[np.lexsort(x.T[::-1])])
    assert not np.array_equal(seen, x)


def test_dropout_drops_p_and_scales_the_rest_in_training_only():
    p = 0.3
    model = build(DROPOUT_ONLY)
    calls = spy_steps(model)
    rng = np.random.default_rng(0)
    x = rng.uniform(1.0, 2.0, (64, 1000)).astype(np.float32)
    y = rng.integers(0, 1000, 64)
    model.fit(x, y, epochs=2, batch=32, progress=False)
    assert len(calls) == 4
    masks = []
    for c in calls:
        out, xb = c["out"], c["x"]
        dropped = out == 0
        assert abs(dropped.mean() - p) < 0.01, dropped.mean()
        kept = ~dropped
        np.testing.assert_allclose(out[kept], xb[kept] / (1 - p), rtol=1e-6)
        masks.append(dropped)
    # a different mask at every step, and different across the images of a batch
    assert len({m.tobytes() for m in masks}) == 4
    assert not np.array_equal(masks[0][0], masks[0][1])
    assert len({c["seed"] for c in calls}) == 4
    # inference: dropout is off, the network is the identity
    np.testing.assert_array_equal(model(x), x)
    _, acc, _ = evaluate(model, x, y)
    assert acc is not None


def test_dropout_mask_depends_on_the_step_seed_only():
    x = np.ones((8, 1000), np.float32)
    y = np.zeros(8, np.int64)
    m1, m2 = build(DROPOUT_ONLY), build(DROPOUT_ONLY)
    c1, c2 = spy_steps(m1), spy_steps(m2)
    m1.fit(x, y, epochs=1, batch=8, seed=3, progress=False)
    m2.fit(x, y, epochs=1, batch=8, seed=3, progress=False)
    np.testing.assert_array_equal(c1[0]["out"], c2[0]["out"])
    m3 = build(DROPOUT_ONLY)
    c3 = spy_steps(m3)
    m3.fit(x, y, epochs=1, batch=8, seed=4, progress=False)
    assert not np.array_equal(c1[0]["out"], c3[0]["out"])


# ---- stopping: NaN, max_steps, min_improvement -------------------------------------------------


def test_a_nan_loss_stops_training_and_keeps_the_last_good_weights(data):
    x, y = data
    model = build(MLP)
    calls = spy_steps(model)
    with pytest.raises(TrainingStopped, match=r"the loss became (nan|inf|-inf) at epoch 1, step \d+"):
        model.fit(x, y, epochs=3, batch=32, optimizer="sgd", lr=1e30, progress=False)
    finite = [np.isfinite(c["losses"].astype(np.float64).sum()) for c in calls]
    assert not finite[-1] and all(finite[:-1]) and len(calls) >= 2
    # the weights of the last step whose loss was finite
    np.testing.assert_array_equal(model.flat_params, calls[-2]["params"])
    assert np.isfinite(model.flat_params).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_input_is_refused_before_any_step(bad):
    x, y = blobs(64, seed=1)
    x[40, 3] = bad
    model = build(MLP)
    before = model.flat_params.copy()
    calls = spy_steps(model)
    with pytest.raises(ValueError, match="input 40 holds a NaN or an infinite value"):
        model.fit(x, y, epochs=2, batch=16, optimizer="sgd", lr=0.01, progress=False)
    assert calls == []
    np.testing.assert_array_equal(model.flat_params, before)
    with pytest.raises(ValueError, match="input 40 holds"):
        model.evaluate(x, y)


def test_a_nan_pixel_in_lenet_modern_is_refused_naming_the_image():
    """The reported case: one NaN pixel used to train every weight of the first conv into NaN, silently."""
    import cnnc

    model = cnnc.compile(str(Path(__file__).resolve().parents[2] / "examples" / "lenet_modern.cnn"))
    rng = np.random.default_rng(0)
    x = rng.random((64, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    x[17, 0, 5, 9] = np.nan
    with pytest.raises(ValueError, match="input 17 holds a NaN"):
        model.fit(x, y, epochs=1, progress=False)
    out = model(x[16:18])  # inference is not refused: the NaN reaches the output (ReLU and max pooling keep it)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
    loss, grads = model.value_and_grad(x[16:18], y[16:18])
    assert math.isnan(loss)


def test_non_finite_validation_inputs_and_mse_targets_are_refused(data):
    x, y = data
    xv = x[:20].copy()
    xv[7, 0] = np.nan
    with pytest.raises(ValueError, match="validation input 7 holds"):
        build(MLP).fit(x, y, validation_data=(xv, y[:20]), epochs=1, progress=False)
    targets = np.zeros((len(x), 3), dtype=np.float32)
    targets[11, 2] = np.inf
    with pytest.raises(ValueError, match="target 11 holds a NaN or an infinite value"):
        build(MLP).fit(x, targets, loss="mse", epochs=1, progress=False)


def test_a_bad_row_is_found_behind_a_validation_split():
    x, y = blobs(100, seed=2)
    x[63, 0] = np.nan
    with pytest.raises(ValueError, match="input 63 holds"):  # the caller's index, before the split
        build(MLP).fit(x, y, validation=0.2, epochs=1, progress=False)


def test_a_non_finite_gradient_stops_with_the_weights_and_optimizer_state_of_that_step(data, monkeypatch):
    x, y = data
    model = build(MLP)
    model.native_runs = False  # (each step observed through gradients)
    opt = optimizers.Adam(lr=0.01)
    original = model.gradients
    steps = []

    def gradients(*args, **kwargs):
        value = original(*args, **kwargs)
        steps.append((model.flat_params.copy(), opt.state_dict()))
        if len(steps) == 4:
            model.flat_grads[5] = np.nan  # what a NaN the forward hid (maxnum) did to the backward
        return value

    model.gradients = gradients
    with pytest.raises(TrainingStopped, match=r"a gradient became NaN or infinite at epoch 1, step 4; kept the "
                                              r"weights of that step"):
        model.fit(x, y, epochs=2, batch=32, optimizer=opt, progress=False)
    params, state = steps[-1]
    np.testing.assert_array_equal(model.flat_params, params)
    assert opt.t == state["t"] == 3
    for k in ("m", "v"):
        np.testing.assert_array_equal(opt.state_dict()[k], state[k])
    assert np.isfinite(model.flat_params).all()


@pytest.mark.parametrize("bad_step, message", [
    (3, "an update made a weight NaN or infinite in epoch 1"),  # the next step sees it (and a NaN loss)
    (10, "an update made a weight NaN or infinite in epoch 1"),  # the last step of the epoch: no next step
])
def test_an_update_that_makes_a_weight_non_finite_is_undone(data, bad_step, message):
    x, y = data
    model = build(MLP)
    calls = spy_steps(model)

    class Overflowing(optimizers.SGD):
        def _update(self, params, grads, tmp):
            super()._update(params, grads, tmp)
            if self.t == bad_step:
                params[2] = np.inf

    with pytest.raises(TrainingStopped, match=message):
        model.fit(x, y, epochs=1, batch=30, optimizer=Overflowing(lr=0.01), progress=False)
    np.testing.assert_array_equal(model.flat_params, calls[bad_step - 1]["params"])


def test_a_huge_but_finite_gradient_is_not_a_stop(data):
    model = build(MLP)
    model.native_runs = False  # (each step observed through gradients)
    x, y = data
    original = model.gradients

    def gradients(*args, **kwargs):
        value = original(*args, **kwargs)
        model.flat_grads[0] = 3e30  # its square overflows float32 (the quick check); the exact check passes it
        return value

    model.gradients = gradients
    h = model.fit(x, y, epochs=1, batch=100, optimizer="sgd", lr=1e-31, progress=False)
    assert h.stopped == "completed 1 epochs"
    assert np.isfinite(model.flat_params).all()


@pytest.mark.parametrize("max_steps, epochs, last_steps", [(5, 1, 5), (10, 1, 10), (15, 2, 15), (100, 3, 30)])
def test_max_steps(data, max_steps, epochs, last_steps):
    x, y = data
    model = build(MLP)
    calls = spy_steps(model)
    h = model.fit(x, y, epochs=3, batch=30, max_steps=max_steps, progress=False)  # 10 steps per epoch
    assert len(h.epochs) == epochs
    assert h.epochs[-1].steps == last_steps == len(calls)
    if max_steps <= 30:
        assert h.stopped == f"reached the step limit of {max_steps}"
    else:
        assert h.stopped == "completed 3 epochs"


def test_min_improvement_stops_when_progress_stalls(data):
    x, y = data
    h = build(MLP).fit(x, y, epochs=20, batch=30, optimizer="adam", lr=0.01, min_improvement=10.0,
                       progress=False)
    assert len(h.epochs) == 2  # epoch 1 always improves on nothing; epoch 2 cannot improve by 10
    assert h.stopped == "the training loss improved by less than 10.0"


def test_lr_decay_multiplies_the_learning_rate_every_epoch(data, monkeypatch):
    x, y = data
    seen: list[float] = []
    original = optimizers.SGD.step

    def step(self, params, grads, mask=None):
        seen.append(self.lr)
        original(self, params, grads, mask)

    monkeypatch.setattr(optimizers.SGD, "step", step)
    monkeypatch.setattr(train_mod, "unsupported", lambda *args: "observed")  # (each update through step)
    build(MLP).fit(x, y, epochs=3, batch=100, optimizer="sgd", lr=0.2, lr_decay=0.5, progress=False)
    assert seen == pytest.approx([0.2] * 3 + [0.1] * 3 + [0.05] * 3, rel=1e-12)
    seen.clear()
    build(MLP).fit(x, y, epochs=2, batch=150, optimizer="sgd", lr=0.2, progress=False)
    assert seen == [0.2] * 4


def test_lr_decay_from_the_train_section(data, monkeypatch):
    x, y = data
    section = "train {\n    optimizer sgd(lr=0.1)\n    lr_decay 0.9\n}\n"
    text = MLP.replace("network tiny", "network tinysched") + section
    seen: list[float] = []
    original = optimizers.SGD.step

    def step(self, params, grads, mask=None):
        seen.append(self.lr)
        original(self, params, grads, mask)

    monkeypatch.setattr(optimizers.SGD, "step", step)
    monkeypatch.setattr(train_mod, "unsupported", lambda *args: "observed")  # (each update through step)
    build(text).fit(x, y, epochs=3, batch=300, progress=False)
    assert seen == pytest.approx([0.1, 0.09, 0.081], rel=1e-12)


def test_lr_decay_restarts_from_the_full_rate_with_an_optimizer_object(data, monkeypatch):
    x, y = data
    seen: list[float] = []
    original = optimizers.SGD.step

    def step(self, params, grads, mask=None):
        seen.append(self.lr)
        original(self, params, grads, mask)

    monkeypatch.setattr(optimizers.SGD, "step", step)
    monkeypatch.setattr(train_mod, "unsupported", lambda *args: "observed")  # (each update through step)
    opt = optimizers.SGD(lr=0.2)
    build(MLP).fit(x, y, epochs=2, batch=300, optimizer=opt, lr_decay=0.5, restarts=2, progress=False)
    assert seen == pytest.approx([0.2, 0.1, 0.2, 0.1], rel=1e-12)


def test_lr_decay_restarts_from_the_full_rate_by_name(data, monkeypatch):
    x, y = data
    seen: list[float] = []
    original = optimizers.SGD.step

    def step(self, params, grads, mask=None):
        seen.append(self.lr)
        original(self, params, grads, mask)

    monkeypatch.setattr(optimizers.SGD, "step", step)
    monkeypatch.setattr(train_mod, "unsupported", lambda *args: "observed")  # (each update through step)
    build(MLP).fit(x, y, epochs=2, batch=300, optimizer="sgd", lr=0.2, lr_decay=0.5, restarts=2, progress=False)
    assert seen == pytest.approx([0.2, 0.1, 0.2, 0.1], rel=1e-12)


# ---- checkpoints and resuming ----------------------------------------------------------------------


RESUME_SETTINGS = dict(batch=24, optimizer="adam", lr=0.01, jitter=0.1, validation=0.2, seed=7,
                       lr_decay=0.9, progress=False)


def test_resume_equals_an_unbroken_run(tmp_path):
    x, y = blobs(200, seed=4)
    whole = build(MLP_DROPOUT)
    h_whole = whole.fit(x, y, epochs=4, checkpoint=tmp_path / "whole.ckpt", **RESUME_SETTINGS)

    first = build(MLP_DROPOUT)
    ckpt = tmp_path / "part.ckpt"
    first.fit(x, y, epochs=2, checkpoint=ckpt, **RESUME_SETTINGS)
    assert not np.array_equal(first.flat_params, whole.flat_params)

    fresh = build(MLP_DROPOUT, seed=99)  # a new object with other weights: all state comes from the file
    h_resumed = fresh.fit(x, y, epochs=4, resume=ckpt, checkpoint=ckpt, **RESUME_SETTINGS)
    np.testing.assert_array_equal(fresh.flat_params, whole.flat_params)
    assert [e.loss for e in h_resumed.epochs] == [e.loss for e in h_whole.epochs]
    assert [e.val_loss for e in h_resumed.epochs] == [e.val_loss for e in h_whole.epochs]
    assert [e.steps for e in h_resumed.epochs] == [e.steps for e in h_whole.epochs]
    # the two checkpoints agree too (apart from timings)
    with np.load(tmp_path / "whole.ckpt") as a, np.load(ckpt) as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            if k != "meta":
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_with_momentum_and_patience(tmp_path):
    x, y = blobs(150, seed=6)
    settings = dict(batch=16, optimizer="momentum", lr=0.05, patience=10, validation=0.2, seed=1,
                    progress=False)
    whole = build(MLP)
    whole.fit(x, y, epochs=3, **settings)
    part = build(MLP)
    part.fit(x, y, epochs=1, checkpoint=tmp_path / "c", **settings)
    fresh = build(MLP)
    fresh.fit(x, y, epochs=3, resume=tmp_path / "c", **settings)
    np.testing.assert_array_equal(fresh.flat_params, whole.flat_params)


def test_resume_with_min_improvement_stops_like_an_unbroken_run(tmp_path):
    x, y = blobs(200, seed=4)
    settings = dict(batch=20, optimizer="adam", lr=0.01, seed=0, progress=False)
    probe = build(MLP).fit(x, y, epochs=4, **settings)
    gains = [a.loss - b.loss for a, b in zip(probe.epochs, probe.epochs[1:])]
    threshold = gains[1] + 1e-9  # epochs 1-2 improve enough... epoch 3 improves by gains[1] < threshold
    assert gains[0] >= threshold, gains
    whole = build(MLP).fit(x, y, epochs=4, min_improvement=threshold, **settings)
    assert len(whole.epochs) == 3
    build(MLP).fit(x, y, epochs=2, min_improvement=threshold, checkpoint=tmp_path / "c", **settings)
    resumed = build(MLP).fit(x, y, epochs=4, min_improvement=threshold, resume=tmp_path / "c", **settings)
    assert len(resumed.epochs) == len(whole.epochs)


def test_resume_with_restarts_equals_an_unbroken_run(tmp_path, data):
    x, y = data
    settings = dict(epochs=3, batch=50, optimizer="sgd", lr=0.05, restarts=2, seed=0, progress=False)
    whole = build(MLP)
    h_whole = whole.fit(x, y, **settings)

    class Interrupt(Exception):
        pass

    def stop_in_the_second_restart(e):  # after the checkpoint of the second restart's first epoch
        if e.restart == 1 and e.epoch == 2:
            raise Interrupt

    ckpt = tmp_path / "c"
    with pytest.raises(Interrupt):
        build(MLP).fit(x, y, checkpoint=ckpt, on_epoch=stop_in_the_second_restart, **settings)
    fresh = build(MLP)
    h_resumed = fresh.fit(x, y, resume=ckpt, **settings)
    assert [r["loss"] for r in h_resumed.restarts] == [r["loss"] for r in h_whole.restarts]
    np.testing.assert_array_equal(fresh.flat_params, whole.flat_params)


def test_checkpoint_is_written_every_epoch(tmp_path, data):
    x, y = data
    ckpt = tmp_path / "run.ckpt"
    epochs_seen = []
    model = build(MLP)

    def on_epoch(e):
        if ckpt.exists():
            with np.load(ckpt) as z:
                epochs_seen.append(json.loads(bytes(z["meta"]).decode())["epoch"])

    model.fit(x, y, epochs=3, batch=100, checkpoint=ckpt, on_epoch=on_epoch, progress=False)
    assert epochs_seen in ([1, 2], [1, 2, 3])  # each epoch's checkpoint, written around its on_epoch call
    with np.load(ckpt) as z:
        assert {f"param/{k}" for k in model.params} <= set(z.files)
        for k in model.params:
            np.testing.assert_array_equal(z[f"param/{k}"], model.params[k])
    assert sorted(os.listdir(tmp_path)) == ["run.ckpt"]  # no temporary files left behind


def test_resume_refuses_another_network_or_optimizer(tmp_path, data):
    x, y = data
    build(MLP).fit(x, y, epochs=1, batch=100, optimizer="adam", checkpoint=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="not tinydrop"):
        build(MLP_DROPOUT).fit(x, y, epochs=2, batch=100, optimizer="adam", resume=tmp_path / "c",
                               progress=False)
    with pytest.raises(ValueError, match="adam|Adam"):
        build(MLP).fit(x, y, epochs=2, batch=100, optimizer="sgd", resume=tmp_path / "c", progress=False)


# ---- damaged checkpoints: one clear ValueError, whatever the damage ----------------------------------------


DAMAGE_SETTINGS = dict(epochs=2, batch=32, optimizer="adam", lr=0.01, restarts=2, seed=3, progress=False)


@pytest.fixture(scope="module")
def interrupted_checkpoint(tmp_path_factory, data):
    """A checkpoint written by Ctrl-C in the middle of restart 2's first epoch: it has every field there is
    (partial epoch, kept run, finished restarts)."""
    x, y = data
    path = tmp_path_factory.mktemp("damage") / "c.npz"
    steps = {"n": 0}
    original = train_mod._deferred_interrupt.is_set

    def ctrl_c_at_step_25(self) -> bool:
        steps["n"] += 1
        return steps["n"] == 25  # restart 1 takes 2 * 10 steps

    train_mod._deferred_interrupt.is_set = ctrl_c_at_step_25
    train_mod.run_length, run_length = (lambda seconds, limit: 1), train_mod.run_length  # (checked every step)
    try:
        with pytest.raises(KeyboardInterrupt):
            build(MLP).fit(x, y, checkpoint=path, **DAMAGE_SETTINGS)
    finally:
        train_mod._deferred_interrupt.is_set = original
        train_mod.run_length = run_length
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
    assert meta["partial"] and meta["kept"] and meta["finished"]
    return path


def resume_from(path, data, **settings):
    x, y = data
    return build(MLP).fit(x, y, resume=path, **{**DAMAGE_SETTINGS, **settings})


def test_the_interrupted_checkpoint_resumes(interrupted_checkpoint, data):
    assert len(resume_from(interrupted_checkpoint, data).restarts) == 2


def test_random_bit_flips_resume_or_give_one_value_error(interrupted_checkpoint, data, tmp_path):
    raw = interrupted_checkpoint.read_bytes()
    rng = np.random.default_rng(16)
    outcomes = {"resumed": 0, "refused": 0}
    for bit in rng.choice(len(raw) * 8, size=60, replace=False):
        damaged = bytearray(raw)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path = tmp_path / "flipped.npz"
        path.write_bytes(bytes(damaged))
        try:
            h = resume_from(path, data)
        except ValueError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
        else:
            assert len(h.restarts) == 2 and np.isfinite([e.loss for e in h.epochs]).all()
            outcomes["resumed"] += 1
    assert outcomes["refused"] > 30  # the CRC catches flips in the data; a flip in a timestamp is harmless


MISSING = object()


def edited(src, dst, path: tuple, value) -> None:
    """A copy of checkpoint `src` with the metadata field at `path` set to `value` (or removed: MISSING)."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    node = meta
    for key in path[:-1]:
        node = node[key]
    if value is MISSING:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(dst, **arrays)


@pytest.mark.parametrize("path, value", [
    (("epoch",), "2"), (("epoch",), -1), (("epoch",), 5), (("epoch",), MISSING), (("epoch",), 1.5),
    (("step",), None), (("step",), -3), (("step",), MISSING),
    (("restart",), 7), (("restart",), -1), (("restart",), "1"), (("restart",), MISSING),
    (("best_loss",), "low"), (("best_loss",), MISSING), (("best_loss",), [1]),
    (("best_epoch",), 0), (("best_epoch",), 99), (("best_epoch",), "1"),
    (("bad_epochs",), -1), (("bad_epochs",), True), (("bad_epochs",), MISSING),
    (("rng",), {}), (("rng",), "PCG64"), (("rng",), MISSING), (("rng", "state"), {"state": "x", "inc": 1}),
    (("rng", "bit_generator"), "MT19937"),
    (("history",), {}), (("history",), [{"epoch": 1}]), (("history",), MISSING),
    (("optimizer",), 3), (("optimizer",), MISSING), (("network",), None), (("network",), MISSING),
    (("seed",), -1), (("seed",), "3"), (("seed",), MISSING),
    (("finished",), None), (("finished",), [{"restart": 0}]), (("finished",), [7]), (("finished",), MISSING),
    (("partial",), []), (("partial", "next"), 0), (("partial", "next"), 10**6), (("partial", "next"), MISSING),
    (("partial", "seen"), 0), (("partial", "seen"), "7"), (("partial", "total"), None),
    (("partial", "correct"), -1), (("partial", "correct"), 10**6), (("partial", "seconds"), MISSING),
    (("kept",), 3), (("kept", "loss"), None), (("kept", "history"), 1), (("kept", "stopped"), 0),
    (("kept", "best_epoch"), -2), (("kept", "history"), [{"epoch": "x"}]),
])
def test_edited_metadata_is_one_value_error(interrupted_checkpoint, data, tmp_path, path, value):
    damaged = tmp_path / "edited.npz"
    edited(interrupted_checkpoint, damaged, path, value)
    with pytest.raises(ValueError, match=f"{damaged}"):
        resume_from(damaged, data)


@pytest.mark.parametrize("array, value", [
    ("best_params", np.zeros(3, np.float32)), ("kept_params", np.array(["a"])), ("partial_order", np.zeros(5)),
    ("opt/m", np.zeros((2, 2), np.float32)), ("opt/lr", np.zeros(3)), ("opt/t", np.array(-1)),
    ("opt/beta1", np.array(1.5)), ("param/h.weight", np.full((16, 8), np.nan, np.float32)),
])
def test_edited_arrays_are_one_value_error(interrupted_checkpoint, data, tmp_path, array, value):
    with np.load(interrupted_checkpoint) as z:
        arrays = {k: z[k] for k in z.files}
    assert array in arrays or array.startswith("param/")
    arrays[array] = value
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(ValueError, match="edited.npz"):
        resume_from(tmp_path / "edited.npz", data)


def test_a_member_claiming_an_array_larger_than_memory_is_one_value_error(interrupted_checkpoint, data, tmp_path):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    bad = tmp_path / "huge.npz"
    with zipfile.ZipFile(interrupted_checkpoint) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, header.getvalue() if name == "best_params.npy" else src.read(name))
    with pytest.raises(ValueError, match="huge.npz: not a cnnc checkpoint"):
        resume_from(bad, data)


def test_a_single_array_is_not_a_checkpoint(data, tmp_path):
    np.save(tmp_path / "w.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="w.npy: not a cnnc checkpoint"):
        resume_from(tmp_path / "w.npy", data)


def test_a_missing_or_unreadable_checkpoint_says_so(data, tmp_path):
    """(was "not a cnnc checkpoint (not an .npz archive)": zipfile.is_zipfile of a missing file is False)"""
    with pytest.raises(ValueError, match="missing.ckpt: not a readable cnnc checkpoint .FileNotFoundError"):
        resume_from(tmp_path / "missing.ckpt", data)
    with pytest.raises(ValueError, match="not a readable cnnc checkpoint .IsADirectoryError"):
        resume_from(tmp_path, data)


def test_a_mid_epoch_checkpoint_on_a_smaller_dataset_is_refused(interrupted_checkpoint, data):
    x, y = data
    with pytest.raises(ValueError, match=r"its interrupted epoch is over another set of images than these 200"):
        build(MLP).fit(x[:200], y[:200], resume=interrupted_checkpoint, **DAMAGE_SETTINGS)


def test_a_checkpoint_of_a_later_restart_needs_as_many_restarts(interrupted_checkpoint, data):
    with pytest.raises(ValueError, match="was written in restart 2; resume it with restarts >= 2"):
        resume_from(interrupted_checkpoint, data, restarts=1)


_CHECKPOINT_WRITER = """
import sys, types
import numpy as np
from cnnc_runtime.settings import Settings
from cnnc_runtime.train import _Run, save_checkpoint

path, size = sys.argv[1], int(sys.argv[2])
flat = np.zeros(size, np.float32)
params = {"w": flat[: size // 2], "b": flat[size // 2:]}
model = types.SimpleNamespace(name="big", flat_params=flat, params=params, state=lambda: params,
                              snapshot=lambda out=None: flat.copy())
s = Settings(optimizer="sgd", lr=0.1)
run = _Run(model, s, 0, base_lr=0.01)
k = 0
while True:
    flat[...] = k
    run.best_params[...] = k
    run.epoch = k
    save_checkpoint(path, model, run, s)
    if k == 2:
        print("ready", flush=True)
    k += 1
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_a_checkpoint_survives_a_kill_mid_write(tmp_path):
    size = 1 << 21  # 8 MB of parameters, twice (weights and best weights): a write takes a while
    path = tmp_path / "run.ckpt"
    seen = set()
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", _CHECKPOINT_WRITER, str(path), str(size)],
                                stdout=subprocess.PIPE)
        try:
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        with np.load(path) as z:  # loads, and is one complete checkpoint
            meta = json.loads(bytes(z["meta"]).decode())
            k = meta["epoch"]
            assert k >= 2
            w, b, best = z["param/w"], z["param/b"], z["best_params"]
        assert w.shape == (size // 2,) and b.shape == (size - size // 2,) and best.shape == (size,)
        assert (w == k).all() and (b == k).all() and (best == k).all()
        seen.add(k)
    assert len(seen) > 1


# ---- seeds and validation ----------------------------------------------------------------------------


def test_the_same_seed_gives_identical_training(data):
    x, y = data
    settings = dict(epochs=3, batch=32, jitter=0.05, validation=0.1, optimizer="adam", lr=0.01,
                    progress=False)
    a, b, c = build(MLP_DROPOUT, seed=1), build(MLP_DROPOUT, seed=1), build(MLP_DROPOUT, seed=1)
    ha = a.fit(x, y, seed=5, **settings)
    hb = b.fit(x, y, seed=5, **settings)
    hc = c.fit(x, y, seed=6, **settings)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    assert [e.loss for e in ha.epochs] == [e.loss for e in hb.epochs]
    assert not np.array_equal(a.flat_params, c.flat_params)
    assert [e.loss for e in ha.epochs] != [e.loss for e in hc.epochs]


@pytest.mark.parametrize("n, fraction, held_out", [(300, 0.1, 30), (301, 0.15, 45), (100, 0.25, 25), (10, 0.5, 5)])
def test_validation_split_holds_out_the_right_count(n, fraction, held_out, monkeypatch):
    x, y = blobs(n)
    sizes = []
    original = train_mod._evaluate

    def spy(model, xv, yv, targets, loss):
        sizes.append(len(xv))
        return original(model, xv, yv, targets, loss)

    monkeypatch.setattr(train_mod, "_evaluate", spy)
    model = build(MLP)
    calls = spy_steps(model)
    model.fit(x, y, epochs=2, batch=16, validation=fraction, progress=False)
    assert sizes == [held_out, held_out]
    trained = np.concatenate([c["x"] for c in calls])
    assert len(trained) == 2 * (n - held_out)
    # the held-out images are never trained on, and the same ones are held out every epoch
    first_epoch = {r.tobytes() for r in trained[: n - held_out]}
    second_epoch = {r.tobytes() for r in trained[n - held_out:]}
    assert first_epoch == second_epoch
    assert len(first_epoch | {r.tobytes() for r in x}) == n


def test_validation_split_that_leaves_nothing_is_refused():
    x, y = blobs(10)
    with pytest.raises(ValueError, match="leaves no images"):
        build(MLP).fit(x, y, epochs=1, validation=0.01, progress=False)


def test_validation_data_is_used_as_given(data):
    x, y = data
    xv, yv = blobs(50, seed=9)
    model = build(MLP)
    h = model.fit(x, y, validation_data=(xv, yv), epochs=2, batch=64, progress=False)
    assert h.epochs[-1].val_loss == pytest.approx(model.evaluate(xv, yv)[0], rel=1e-12)
    assert h.epochs[-1].images_per_second * h.epochs[-1].seconds == pytest.approx(len(x))


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs must be a positive integer, got 0"),
    (dict(epochs=1.5), "epochs must be a positive integer, got 1.5"),
    (dict(epochs=True), "epochs must be a positive integer, got True"),
    (dict(batch=0), "batch must be a positive integer"),
    (dict(restarts=0), "restarts must be a positive integer"),
    (dict(max_steps=0), "max_steps must be a positive integer, got 0"),
    (dict(validation=-0.1), r"validation must be a fraction in \[0, 1\), got -0.1"),
    (dict(validation=1.0), r"validation must be a fraction in \[0, 1\)"),
    (dict(jitter=-1.0), "jitter must be a non-negative number"),
    (dict(jitter=float("nan")), "jitter must be a non-negative number"),
    (dict(weight_decay=-1e-4), "weight_decay must be a non-negative number"),
    (dict(lr_decay=0.0), r"lr_decay must be a factor in \(0, 1\]"),
    (dict(lr_decay=-0.5), r"lr_decay must be a factor in \(0, 1\]"),
    (dict(lr_decay=1.5), r"lr_decay must be a factor in \(0, 1\]"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(min_improvement=-1.0), "min_improvement must be a non-negative number"),
    (dict(patience=0), "patience must be a positive integer"),
    (dict(patience=2.5), "patience must be a positive integer, got 2.5"),
    (dict(patience=2, min_delta=-1), "min_delta must be a non-negative number"),
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(lr=-1e-3), "lr must be a positive number"),
    (dict(optimizer="adam", optimizer_args={"beta1": 1.5}), r"adam beta1 must be in \[0, 1\), got 1.5"),
    (dict(optimizer="adam", optimizer_args={"eps": 0.0}), "adam eps must be a positive number"),
    (dict(optimizer="momentum", optimizer_args={"beta": 1.0}), r"momentum beta must be in \[0, 1\)"),
    (dict(optimizer="rmsprop", optimizer_args={"beta": -0.1}), r"rmsprop beta must be in \[0, 1\)"),
])
def test_bad_settings_are_refused_as_the_train_section_refuses_them(data, bad, message):
    x, y = data
    model = build(MLP)
    calls = spy_steps(model)
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, progress=False, **bad)
    assert calls == []


def test_a_batch_larger_than_the_set_is_the_whole_set(data):
    x, y = data
    model = build(MLP)
    calls = spy_steps(model)
    h = model.fit(x, y, epochs=2, batch=10**12, progress=False)  # buffers sized by min(batch, N)
    assert [len(c["x"]) for c in calls] == [len(x), len(x)]
    assert h.epochs[-1].steps == 2


def test_unknown_settings_are_refused(data):
    x, y = data
    with pytest.raises(TypeError, match="unknown training setting 'epoch'"):
        build(MLP).fit(x, y, epoch=3, progress=False)


def test_log_writes_one_json_line_per_epoch(tmp_path, data):
    x, y = data
    log = tmp_path / "m.jsonl"
    build(MLP).fit(x, y, epochs=3, batch=100, log=log, progress=False)
    lines = log.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("run", [1, 3])
def test_ctrl_c_mid_epoch_saves_a_checkpoint_that_resumes_exactly(data, tmp_path, monkeypatch, run):
    """Ctrl-C is acted on between two steps (in native runs of `run` steps: between two runs): the checkpoint
    then holds the half-done epoch."""
    x, y = data
    settings = dict(epochs=3, batch=16, optimizer="adam", lr=0.01, jitter=0.05, seed=4, progress=False)
    unbroken = build(MLP)
    unbroken.fit(x, y, **settings)

    steps = {"n": 0}
    per_epoch = math.ceil(len(x) // 16 / run) + (len(x) % 16 > 0)  # the checks an epoch makes: one per run

    def fake_is_set(self) -> bool:  # a Ctrl-C arrives during the 3rd run of the second epoch
        steps["n"] += 1
        return steps["n"] == per_epoch + 3

    monkeypatch.setattr(train_mod._deferred_interrupt, "is_set", fake_is_set)
    monkeypatch.setattr(train_mod, "run_length", lambda seconds, limit: run)
    stopped = build(MLP)
    ckpt = tmp_path / "c.npz"
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(x, y, checkpoint=ckpt, **settings)
    monkeypatch.undo()
    resumed = build(MLP)
    resumed.fit(x, y, resume=ckpt, checkpoint=ckpt, **settings)
    for name in unbroken.params:
        np.testing.assert_array_equal(resumed.params[name], unbroken.params[name])


# ---- uint8 images as stored: prepared a batch at a time, the same training bit for bit ------------------------


def stored_digits(n: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 6, 6) images, as a dataset stores them: class k has its ink in column band k."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 6, 6))
    for k in range(3):
        x[y == k, :, 2 * k:2 * k + 2] += 190
    return x.astype(np.uint8), y.astype(np.int64)


def prepared(model, x: np.ndarray) -> np.ndarray:
    """The same images as float32 in [0, 1], padded: what a Python caller holds; the model normalizes them."""
    return prepare_images(x, model.input_shape)


def normalized(model, x: np.ndarray) -> np.ndarray:
    """The network's input for the images x: padded, scaled, then (x - mean) / std in float32."""
    norm = model.manifest["train"]["normalize"]
    return (prepare_images(x, model.input_shape) - np.float32(norm["mean"])) / np.float32(norm["std"])


@pytest.mark.parametrize("settings", [
    dict(),
    dict(validation=0.2, jitter=0.05, optimizer="momentum"),
], ids=["plain", "validation-jitter"])
def test_uint8_training_equals_float32_training(settings):
    x, y = stored_digits()
    results = []
    for make in (lambda m: prepared(m, x), lambda m: x):
        model = build(PADDED, seed=1)
        h = model.fit(make(model), y, epochs=2, batch=32, seed=4, progress=False, **settings)
        results.append((model.flat_params.copy(), [(e.loss, e.accuracy, e.val_loss, e.val_accuracy) for e in h.epochs],
                        evaluate(model, make(model), y)))
    (p_float, h_float, e_float), (p_u8, h_u8, e_u8) = results
    np.testing.assert_array_equal(p_u8.view(np.uint32), p_float.view(np.uint32))
    assert h_u8 == h_float
    assert e_u8[:2] == e_float[:2]
    np.testing.assert_array_equal(e_u8[2], e_float[2])


def test_uint8_validation_data_and_forward_match_float32():
    x, y = stored_digits()
    xv, yv = stored_digits(40, seed=5)
    model = build(PADDED, seed=2)
    model.fit(x, y, validation_data=(xv, yv), epochs=1, batch=50, progress=False)
    np.testing.assert_array_equal(model(xv), model(prepared(model, xv)))
    assert model.evaluate(xv, yv) == model.evaluate(prepared(model, xv), yv)
    np.testing.assert_array_equal(model.predict(xv[:3, None]), model.predict(prepared(model, xv[:3])))


def test_uint8_batches_reach_the_native_step_prepared():
    x, y = stored_digits(20)
    model = build(PADDED)
    calls = spy_steps(model)
    model.fit(x, y, epochs=1, batch=8, progress=False, seed=3)
    seen = np.concatenate([c["x"] for c in calls])
    assert seen.dtype == np.float32 and seen.shape == (20, 1, 8, 8)
    want = normalized(model, x)
    assert sorted(r.tobytes() for r in seen) == sorted(r.tobytes() for r in want)


@pytest.mark.parametrize(("bad", "message"), [
    (np.zeros((4, 9, 9), np.uint8), r"expected input of shape \(N, 1, 8, 8\).*larger than"),
    (np.zeros((4, 2, 6, 6), np.uint8), r"expected input of shape \(N, 1, 8, 8\).*channel"),
    (np.zeros((4, 36), np.uint8), r"expected input of shape \(N, 1, 8, 8\).*flat inputs of 36"),
    (np.zeros((4, 9, 9), np.float32), r"expected input of shape \(N, 1, 8, 8\), got \(4, 9, 9\): .*larger than"),
    (np.zeros((0, 6, 6), np.uint8), r"expected input of shape \(N, 1, 8, 8\) with N >= 1"),
    (np.zeros((4, 6, 6), np.complex64), r"expected input of shape \(N, 1, 8, 8\) with a numeric dtype"),
], ids=["too-large", "channels", "flat", "float-too-large", "empty", "complex"])
def test_images_that_do_not_fit_are_refused_naming_the_shape(bad, message):
    model = build(PADDED)
    y = np.zeros(len(bad), np.int64)
    with pytest.raises(ValueError, match=message):
        model.fit(bad, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match=message):
        model.evaluate(bad, y)
    with pytest.raises(ValueError, match=message):
        model.fit(stored_digits(8)[0], np.zeros(8, np.int64), validation_data=(bad, y), epochs=1, progress=False)


@pytest.mark.parametrize("argument", ["checkpoint", "resume", "log"])
def test_a_file_argument_that_is_not_a_path_is_refused(data, argument):
    """`True` or `1` is a file descriptor to ``open``: fit(resume=True) read stdout as a checkpoint and closed it."""
    x, y = data
    model = build(MLP)
    before = model.flat_params.copy()
    with pytest.raises(ValueError, match=f"{argument} must be a path"):
        model.fit(x, y, epochs=1, progress=False, **{argument: True})
    np.testing.assert_array_equal(model.flat_params, before)
    os.fstat(1)  # (still open)


def test_ranks_that_each_compiled_the_same_network_agree_on_it(monkeypatch):
    """The ranks of a job that each compiled the network (no cache yet) agree it is the same network, by its
    manifest (whose cache_key hashes what the code is made from), whatever the layout of the code's bytes (a
    parallel compile's once depended on which process took which kernel). Here one compile runs in one process,
    the other in parallel."""
    import cnnc
    from cnnc.codegen import target

    text = (Path(__file__).resolve().parents[2] / "examples" / "cifar_small.cnn").read_text()
    parallel = cnnc.compile_string(text, cache=False)
    monkeypatch.setattr(target, "PARALLEL_MIN_COST", math.inf)
    alone = cnnc.compile_string(text, cache=False)
    assert train_mod.network_digest(parallel) == train_mod.network_digest(alone)
    assert train_mod.network_digest(cnnc.compile_string(MLP, cache=False)) != train_mod.network_digest(alone)
