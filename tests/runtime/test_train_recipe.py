"""The training recipe in fit: schedules per step, crop and flip per image (the same on any thread count),
label smoothing and gradient clipping (against PyTorch and hand-derived steps), the lr in the history and log."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from cnnc_runtime import optimizers
from cnnc_runtime import train as train_mod
from cnnc_runtime.model import Model
from cnnc_runtime.schedule import make_schedule
from tests.codegen.test_augment import reference
from tests.reference import build

IMAGES = """
network recipe {
    input x: 3x6x6
    h = x -> conv(4, 3x3, pad=same) -> relu
    y = h -> flatten -> dense(3)
}
train {
    normalize(mean=[0.5, 0.25, 0.75], std=[0.5, 0.25, 2.0])
}
"""


def uint8_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 6, 6), dtype=np.uint8), rng.integers(0, 3, n)


def rates_seen(monkeypatch) -> list[float]:
    """The rate of every SGD step, seen by wrapping ``SGD.step`` (so on the per-step path: a native run of steps
    calls the update natively; tests/runtime/test_steploop.py shows both give the same weights)."""
    monkeypatch.setattr(train_mod, "unsupported", lambda *args: "observed")
    seen: list[float] = []
    original = optimizers.SGD.step

    def step(self, params, grads, mask=None):
        seen.append(self.lr)
        original(self, params, grads, mask)

    monkeypatch.setattr(optimizers.SGD, "step", step)
    return seen


def test_the_schedule_sets_the_rate_of_every_step_and_the_history_and_log_show_it(monkeypatch, tmp_path):
    x, y = uint8_images(40)
    seen = rates_seen(monkeypatch)
    history = build(IMAGES).fit(x, y, epochs=3, batch=10, optimizer="sgd", lr=0.2, schedule="cosine",
                                warmup=1, progress=False, log=tmp_path / "m.jsonl")
    # 4 steps an epoch: warmup 0.05, 0.1, 0.15, 0.2; then a cosine over the 8 steps left
    want = [0.2 * (t + 1) / 4 for t in range(4)] + [0.1 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert [e.lr for e in history.epochs] == pytest.approx([want[3], want[7], want[11]], rel=1e-12)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([want[3], want[7], want[11]], rel=1e-12)


def test_a_step_schedule_from_the_train_section(monkeypatch):
    x, y = uint8_images(20)
    seen = rates_seen(monkeypatch)
    text = IMAGES.replace("train {", "train {\n    optimizer sgd(lr=0.1)\n    schedule step(every=2, gamma=0.5)")
    build(text).fit(x, y, epochs=5, batch=10, progress=False)
    assert seen == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 2, rel=1e-12)
    factors = [make_schedule("step(every=2, gamma=0.5)").factor(t, 2, 10) for t in range(10)]
    assert seen == pytest.approx([0.1 * f for f in factors], rel=1e-12)


def test_each_step_sees_the_crop_and_flip_of_its_prepared_batch(monkeypatch):
    """The batch a step trains on is the numpy reference's crop and flip of the prepared batch, with the
    padding a black pixel after normalization (torchvision's RandomCrop(padding) before Normalize)."""
    x, y = uint8_images(16, seed=3)
    model = build(IMAGES)
    model.native_runs = False  # (each step observed through gradients)
    seen = []
    original = model.gradients

    def spy(xb, *args, **kwargs):
        value = original(xb, *args, **kwargs)
        seen.append(xb.copy())
        return value

    model.gradients = spy
    model.fit(x, y, epochs=1, batch=16, optimizer="sgd", lr=0.01, crop=2, flip=True, seed=5, progress=False)
    rng = np.random.default_rng([5, 0, 1])  # fit's stream for run 0: the order, then the step's augmentation seed
    order = rng.permutation(16)
    shift = int(rng.integers(0, 2**63 - 1))
    prepared = ((x[order].astype(np.float32) / 255 - np.float32([0.5, 0.25, 0.75]).reshape(3, 1, 1))
                / np.float32([0.5, 0.25, 2.0]).reshape(3, 1, 1))
    black = (np.float32(0) - np.float32([0.5, 0.25, 0.75])) / np.float32([0.5, 0.25, 2.0])
    np.testing.assert_array_equal(seen[0], reference(prepared, shift, 2, True, black))
    assert not np.array_equal(seen[0], prepared)


@pytest.mark.parametrize("jitter", [0.0, 0.1])
def test_crop_and_flip_train_to_the_same_bits_on_1_and_2_threads(jitter):
    x, y = uint8_images(96, seed=1)
    compiled = build(IMAGES)
    weights = []
    for threads in (1, 2):
        model = Model(copy.deepcopy(compiled.manifest), compiled._obj, threads=threads)
        model.fit(x, y, epochs=2, batch=48, optimizer="adam", lr=0.01, crop=1, flip=True, jitter=jitter,
                  progress=False)
        weights.append(model.flat_params.copy())
    np.testing.assert_array_equal(weights[0], weights[1])


class _Stop(Exception):
    pass


def test_a_run_resumed_mid_schedule_with_augmentation_equals_an_unbroken_one(tmp_path):
    x, y = uint8_images(40, seed=7)
    settings = dict(epochs=4, batch=16, optimizer="nesterov", lr=0.05, schedule="cosine", warmup=1, crop=1,
                    flip=True, seed=2, progress=False)
    whole = build(IMAGES)
    whole.fit(x, y, **settings)

    def stop_after_two(e):
        if e.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):  # the checkpoint of epoch 2 is written before the epoch is reported
        build(IMAGES).fit(x, y, checkpoint=tmp_path / "c", on_epoch=stop_after_two, **settings)
    fresh = build(IMAGES, seed=9)
    history = fresh.fit(x, y, resume=tmp_path / "c", **settings)
    np.testing.assert_array_equal(fresh.flat_params, whole.flat_params)
    assert [e.lr for e in history.epochs][2:] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 9)) / 2
                                                                 for t in (5, 8)], rel=1e-12)


def test_label_smoothing_steps_with_the_smoothed_gradient():
    """One sgd step of lr 1 on the whole set moves the weights by minus value_and_grad's smoothed gradient."""
    x, y = uint8_images(12, seed=2)
    model = build(IMAGES)
    start = model.flat_params.copy()
    _, grads = model.value_and_grad(x, y, label_smoothing=0.2)  # (uint8 images, prepared as fit prepares them)
    history = model.fit(x, y, epochs=1, batch=12, optimizer="sgd", lr=1.0, label_smoothing=0.2, progress=False)
    for p in model.manifest["params"]:
        span = slice(p["offset"], p["offset"] + p["size"])
        np.testing.assert_allclose(model.flat_params[span] - start[span], -grads[p["name"]].ravel(), rtol=1e-5,
                                   atol=1e-7)
    assert history.epochs[0].loss > 0


def test_value_and_grad_with_label_smoothing_matches_torch():
    """A conv net's smoothed cross-entropy and every gradient against PyTorch (rel. 1e-4)."""
    torch = pytest.importorskip("torch")
    model = build(IMAGES)
    x = np.random.default_rng(4).standard_normal((5, 3, 6, 6)).astype(np.float32)
    y = np.array([0, 2, 1, 1, 0])
    value, grads = model.value_and_grad(x, y, label_smoothing=0.1)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in model.params.items()}
    xp = torch.tensor(model.prepare(x))  # the network's input: the file's per-channel normalize applied
    h = torch.relu(torch.nn.functional.conv2d(xp, p["h.weight"], p["h.bias"], padding=1))
    out = torch.nn.functional.linear(h.flatten(1), p["y.weight"], p["y.bias"])
    want = torch.nn.functional.cross_entropy(out, torch.tensor(y), label_smoothing=0.1)
    want.backward()
    assert value == pytest.approx(want.item(), rel=1e-5)
    for k in grads:
        np.testing.assert_allclose(grads[k], p[k].grad.numpy(), rtol=1e-4, atol=1e-6)


def test_clip_norm_clips_the_step_to_the_norm():
    """One sgd step of lr 1 moves the weights by the gradient scaled to norm 0.01 (torch's clip_grad_norm_)."""
    x, y = uint8_images(12, seed=6)
    model = build(IMAGES)
    start = model.flat_params.copy()
    _, grads = model.value_and_grad(x, y)
    flat = np.zeros_like(start)
    for p in model.manifest["params"]:
        flat[p["offset"]:p["offset"] + p["size"]] = grads[p["name"]].ravel()
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    assert norm > 0.01
    model.fit(x, y, epochs=1, batch=12, optimizer="sgd", lr=1.0, clip_norm=0.01, progress=False)
    # atol: the float32 rounding of weights near 0.5 (ulp 6e-8) in w + step - w
    np.testing.assert_allclose(model.flat_params - start, -flat * (0.01 / (norm + 1e-6)), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("settings, message", [
    ({"crop": 2}, "crop and flip need image inputs"),
    ({"flip": True}, "crop and flip need image inputs"),
    ({"label_smoothing": 0.1, "loss": "mse"}, "label_smoothing applies to cross_entropy, not to mse"),
    ({"label_smoothing": 1.0}, "label_smoothing must be a fraction"),
    ({"schedule": "cosin"}, "unknown schedule 'cosin'"),
    ({"schedule": "cosine", "lr_decay": 0.5}, "cannot go with schedule cosine"),
    ({"warmup": -1}, "warmup must be"),
    ({"clip_norm": 0}, "clip_norm must be a positive number"),
])
def test_bad_recipe_settings_are_value_errors(settings, message):
    model = build("network flatrecipe { input x: 4\n y = x -> dense(3) }")
    x = np.zeros((6, 4), np.float32)
    with pytest.raises(ValueError, match=message):
        model.fit(x, np.arange(6) % 3, epochs=1, progress=False, **settings)
