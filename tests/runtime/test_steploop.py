"""Runs of training steps in native code (``cnnc_runtime.steploop``): the same training as the per-step path.

The oracle is the per-step path itself (``native_runs = False``: one native
step per thread, the sum, the decay and the update from Python), which the
rest of the suite checks against numpy and PyTorch. A native run must give
its weights bit for bit, on 1 and 2 threads, for every optimizer and every
part of a step it runs (the gather from uint8 or float32 sets, crop and flip,
jitter, dropout, L2, label smoothing, mse, a smaller last batch, a schedule),
stop at a NaN as it does, and leave what it does not cover to it.
"""

from __future__ import annotations

import copy
import threading
import types

import numpy as np
import pytest

from cnnc_runtime import steploop
from cnnc_runtime import train as train_mod
from cnnc_runtime.distributed import Local
from cnnc_runtime.model import Model
from cnnc_runtime.optimizers import OPTIMIZERS, SGD
from cnnc_runtime.settings import Settings
from cnnc_runtime.steploop import FIELDS, run_length, unsupported
from cnnc_runtime.train import TrainingStopped
from tests.reference import build

IMAGES = """
network runimg {
    input image: 3x8x8
    c = image -> conv(4, 3x3) -> relu -> maxpool(2x2)
    d = c -> flatten -> dropout(0.25)
    y = d -> dense(3)
}
"""

BATCHNORM = """
network runbn {
    input x: 8
    h = x -> dense(6) -> batchnorm -> relu
    y = h -> dense(3)
}
"""


@pytest.fixture(scope="module")
def compiled():
    m = build(IMAGES)
    return m.manifest, m.code


def model_with(compiled, threads: int, native: bool) -> Model:
    manifest, obj = compiled
    model = Model(copy.deepcopy(manifest), obj, threads=threads)
    model.native_runs = native
    return model


def images(n: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images as a dataset stores them, channels first; class k is bright in channel k."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 80, (n, 3, 8, 8))
    x[np.arange(n), y] += 150
    return x.astype(np.uint8), y


def trained(compiled, threads: int, native: bool, x, y, **settings) -> tuple[Model, list[int]]:
    """A model fitted by the native runs or the per-step path, and the steps each native run took."""
    model = model_with(compiled, threads, native)
    runs: list[int] = []
    original = model.run_steps

    def counted(loss, ctx, used, images):
        runs.append(int(ctx[0]))  # (FIELDS[0]: the run's steps)
        original(loss, ctx, used, images)

    model.run_steps = counted
    model.fit(x, y, progress=False, **{"epochs": 2, "batch": 16, "seed": 3, **settings})
    return model, runs


def assert_same_training(compiled, threads: int, x, y, **settings) -> list[int]:
    native, runs = trained(compiled, threads, True, x, y, **settings)
    per_step, none = trained(compiled, threads, False, x, y, **settings)
    assert runs and not none
    np.testing.assert_array_equal(native.flat_params, per_step.flat_params)
    return runs


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_gives_the_per_step_weights_bit_for_bit(compiled, threads, optimizer):
    x, y = images()
    lr = 0.003 if optimizer.startswith("adam") or optimizer == "rmsprop" else 0.03
    assert_same_training(compiled, threads, x, y, optimizer=optimizer, lr=lr)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("settings", [
    dict(crop=2, flip=True),
    dict(jitter=0.3),
    dict(weight_decay=0.01),
    dict(label_smoothing=0.1, schedule="cosine", warmup=3),
    dict(crop=1, flip=True, jitter=0.2, weight_decay=0.003, optimizer="adamw", lr=0.01, batch=40),
])
def test_every_part_of_a_step_gives_the_per_step_weights_bit_for_bit(compiled, threads, settings):
    x, y = images()
    settings = {"optimizer": "momentum", "lr": 0.02, **settings}
    assert_same_training(compiled, threads, x, y, **settings)
    plain = trained(compiled, threads, True, x, y, optimizer=settings["optimizer"], lr=settings["lr"])[0]
    changed = trained(compiled, threads, True, x, y, **settings)[0]
    assert not np.array_equal(plain.flat_params, changed.flat_params)  # (the setting did act)


@pytest.mark.parametrize("threads", [1, 2])
def test_float_inputs_and_mse_targets_give_the_per_step_weights(compiled, threads):
    x, y = images()
    xf = (x.astype(np.float32) / 255.0).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[y] * 0.8
    assert_same_training(compiled, threads, xf, targets, loss="mse", optimizer="adam", lr=0.003)


def test_a_run_has_many_steps_and_the_history_is_the_per_step_one(compiled, monkeypatch):
    x, y = images(200)
    monkeypatch.setattr(steploop, "RUN_SECONDS", 60.0)  # (runs as long as an epoch allows, on a loaded machine too)
    native, runs = trained(compiled, 2, True, x, y, optimizer="sgd", lr=0.05, epochs=3)
    assert max(runs) > 1 and sum(runs) == 3 * 13  # (12 full batches and a smaller last one an epoch)
    per_step = model_with(compiled, 2, False)
    per_step.restore(native.snapshot())
    native_history = native.fit(x, y, epochs=2, batch=16, seed=9, progress=False)
    per_step_history = per_step.fit(x, y, epochs=2, batch=16, seed=9, progress=False)
    for a, b in zip(native_history.epochs, per_step_history.epochs, strict=True):
        assert (a.loss, a.accuracy, a.steps, a.lr) == (b.loss, b.accuracy, b.steps, b.lr)


def test_the_step_limit_ends_a_run_where_the_per_step_path_stops(compiled):
    x, y = images()
    runs = assert_same_training(compiled, 2, x, y, optimizer="sgd", lr=0.05, max_steps=7)
    assert sum(runs) == 7


@pytest.mark.parametrize("threads", [1, 2])
def test_a_nan_loss_stops_as_the_per_step_path_does(compiled, threads):
    x, y = images()
    stops = []
    for native in (True, False):
        model = model_with(compiled, threads, native)
        with pytest.raises(TrainingStopped) as e:
            model.fit(x, y, epochs=3, batch=16, optimizer="sgd", lr=1e30, seed=3, progress=False)
        stops.append((str(e.value), model.flat_params.copy()))
    assert "the loss became" in stops[0][0] or "NaN or infinite" in stops[0][0]
    assert stops[0][0] == stops[1][0]
    np.testing.assert_array_equal(stops[0][1], stops[1][1])
    assert np.isfinite(stops[0][1]).all()


def test_a_nan_weight_stops_the_first_step_as_the_per_step_path_does(compiled):
    x, y = images()
    stops = []
    for native in (True, False):
        model = model_with(compiled, 2, native)
        model.flat_params[5] = np.nan  # (as a write through a view may leave it)
        with pytest.raises(TrainingStopped) as e:
            model.fit(x, y, epochs=1, batch=16, optimizer="adam", lr=0.01, progress=False)
        stops.append((str(e.value), model.flat_params.copy()))
    assert "NaN" in stops[0][0] and stops[0][0] == stops[1][0]
    np.testing.assert_array_equal(stops[0][1], stops[1][1])


def test_a_step_on_another_thread_waits_for_the_run_and_changes_nothing_in_it(compiled):
    """The model's lock: value_and_grad from another thread while fit runs leaves fit's training as it is alone."""
    x, y = images(300)
    alone, _ = trained(compiled, 2, True, x, y, optimizer="adam", lr=0.003, epochs=3)
    model = model_with(compiled, 2, True)
    done = threading.Event()
    values = []

    def meddle() -> None:
        while not done.is_set():
            values.append(model.value_and_grad(x[:20], y[:20])[0])

    other = threading.Thread(target=meddle)
    other.start()
    try:
        model.fit(x, y, epochs=3, batch=16, seed=3, optimizer="adam", lr=0.003, progress=False)
    finally:
        done.set()
        other.join()
    assert values and np.isfinite(values).all()
    np.testing.assert_array_equal(model.flat_params, alone.flat_params)


def settings(**changes) -> Settings:
    return Settings(**changes)


def test_what_the_native_runs_do_not_cover_keeps_the_per_step_path(compiled):
    model = model_with(compiled, 2, True)
    gather = model.gatherer(model.inputs(images(4)[0]), model.batch_buffer(4))
    sgd = SGD(lr=0.1)
    assert unsupported(model, settings(), gather, sgd) is None
    assert unsupported(model, settings(clip_norm=1.0), gather, sgd) == "gradient clipping"
    assert unsupported(model, settings(), None, sgd) == "an artifact built before native runs"

    class Custom(SGD):
        pass

    assert unsupported(model, settings(), gather, Custom(lr=0.1)) == "Custom has no native update"
    model.native_runs = False
    assert unsupported(model, settings(), gather, sgd) == "switched off (native_runs = False)"
    bn = build(BATCHNORM)
    assert not bn.has_runs
    assert unsupported(bn, settings(), gather, sgd) == "batchnorm"


def test_clipping_trains_on_the_per_step_path(compiled):
    x, y = images()
    _, runs = trained(compiled, 2, True, x, y, optimizer="sgd", lr=0.05, clip_norm=0.5)
    assert runs == []


def test_a_run_lasts_about_run_seconds_within_its_limit():
    assert run_length(0.0, 100) == 1  # (the first run: nothing measured yet)
    assert run_length(0.001, 100) == 50
    assert run_length(0.001, 20) == 20
    assert run_length(1.0, 100) == 1


def test_runs_of_one_step_are_the_per_step_training(compiled, monkeypatch):
    monkeypatch.setattr(train_mod, "run_length", lambda seconds, limit: 1)
    x, y = images()
    runs = assert_same_training(compiled, 2, x, y, optimizer="nesterov", lr=0.02, crop=1, flip=True)
    assert set(runs) == {1}


@pytest.mark.parametrize("change", [lambda m: m.pop("run_fields"), lambda m: m["run_fields"].reverse()])
def test_a_manifest_that_lies_about_the_run_layout_is_refused(compiled, change):
    """The code records the ctx layout its run entries read: a manifest that claims another (or none) is refused
    before any code runs, never misread."""
    manifest, obj = copy.deepcopy(compiled[0]), compiled[1]
    assert manifest["run_fields"] == list(FIELDS)
    change(manifest)
    with pytest.raises(ValueError, match="compiled for"):
        Model(manifest, obj)


def test_more_pool_threads_than_shards_and_the_l2_loss(compiled):
    """Batches of 16 are 2 shards: a pool of 4 runs them on 2 threads; the L2 penalty (summed in float64 per thread
    here, by numpy's float32 dot on the per-step path) is the same loss within rounding, the weights the same bits."""
    x, y = images()
    histories, weights = [], []
    for native in (True, False):
        model = model_with(compiled, 4, native)
        histories.append(model.fit(x, y, epochs=2, batch=16, seed=3, optimizer="sgd", lr=0.05, weight_decay=0.01,
                                   progress=False))
        weights.append(model.flat_params.copy())
    np.testing.assert_array_equal(weights[0], weights[1])
    for a, b in zip(histories[0].epochs, histories[1].epochs, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.accuracy == b.accuracy


def test_a_resume_past_the_step_limit_stops_as_the_per_step_path_does(compiled, tmp_path):
    """A checkpoint with more steps than the limit it is resumed with: the native path must not ask for a run of
    no steps (it raised a ValueError about its own buffers); both paths take the same one step and stop."""
    x, y = images()
    results = []
    for native in (True, False):
        checkpoint = tmp_path / f"{native}.ckpt.npz"
        model_with(compiled, 2, native).fit(x, y, epochs=1, batch=16, seed=3, max_steps=4, checkpoint=checkpoint,
                                            progress=False)
        model = model_with(compiled, 2, native)
        history = model.fit(x, y, epochs=2, batch=16, seed=3, max_steps=2, resume=checkpoint, progress=False)
        results.append((history.stopped, model.flat_params.copy()))
    assert results[0][0] == results[1][0] == "reached the step limit of 2"
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_optimizer_state_the_native_update_cannot_take_trains_on_the_per_step_path(compiled):
    """State loaded between epochs as float64 (a callback's `load_state_dict`): the per-step path updates it in
    numpy; a native run refused it mid-fit ("Adam has no native update"). Now those steps take the per-step path."""
    x, y = images()
    weights = []
    for native in (True, False):
        model = model_with(compiled, 2, native)
        adam = OPTIMIZERS["adam"](lr=0.01)

        def reload(epoch, adam=adam) -> None:
            state = adam.state_dict()
            adam.load_state_dict({k: v.astype(np.float64) if isinstance(v, np.ndarray) else v
                                  for k, v in state.items()})

        model.fit(x, y, epochs=3, batch=16, seed=3, optimizer=adam, on_epoch=reload, progress=False)
        weights.append(model.flat_params.copy())
    np.testing.assert_array_equal(weights[0], weights[1])


def test_a_run_after_a_short_last_batch_is_sized_by_the_images_it_does(compiled, monkeypatch):
    """A run's length comes from the time of the last one. After an epoch's last batch of one image, it was sized
    as if each step of a full batch cost what that one image did: a run 16 times too long (Ctrl-C acts between
    runs). On a clock where each image costs 1 ms, steps of 16 images must run in runs of RUN_SECONDS / 16 ms."""
    clock = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    model = model_with(compiled, 1, True)
    runs = []
    original = model.run_steps

    def timed(loss, ctx, used, images):
        runs.append((int(ctx[0]), int(ctx[1])))  # (FIELDS: the run's steps, its images per step)
        clock[0] += 0.001 * ctx[0] * ctx[1]
        original(loss, ctx, used, images)

    model.run_steps = timed
    x, y = images(16 * 10 + 1)
    model.fit(x, y, epochs=2, batch=16, seed=3, progress=False)
    assert (1, 1) in runs and max(steps for steps, _ in runs) == 3  # (0.05 s / 0.016 s)


def test_a_checkpoint_with_float64_optimizer_state_resumes_as_the_per_step_path_does(compiled, tmp_path):
    """A checkpoint written by hand (or by another tool) with the moments as float64: resumable on both paths,
    to the same weights (the native run refused it with "Adam has no native update")."""
    x, y = images()
    written = tmp_path / "written.ckpt.npz"
    model_with(compiled, 2, True).fit(x, y, epochs=1, batch=16, seed=3, optimizer="adam", checkpoint=written,
                                      progress=False)
    with np.load(written) as z:
        arrays = {k: z[k].astype(np.float64) if k.startswith("opt/") and z[k].dtype == np.float32 else z[k]
                  for k in z.files}
    assert arrays["opt/m"].dtype == np.float64
    forged = tmp_path / "float64.ckpt.npz"
    np.savez(forged, **arrays)
    weights = []
    for native in (True, False):
        model = model_with(compiled, 2, native)
        model.fit(x, y, epochs=2, batch=16, seed=3, optimizer="adam", resume=forged, progress=False)
        weights.append(model.flat_params.copy())
    np.testing.assert_array_equal(weights[0], weights[1])


class Twin(Local):
    """Rank 0 of two whose peer holds exactly what it holds: every sum doubles (what a job's ranks add up, for
    the wiring of the ranks' sum into a run without an MPI job).

    `shared`: the run writes its gradient into the comm's own memory, as ranks on one machine do; "sharded": and
    the update is sharded (``cnnc_runtime.sharded``), this rank's part being all of the weights (the peer's is
    empty: a meet adds nothing to this rank's values).
    """

    size = 2

    def __init__(self, fail_at: int | None = None, shared: bool | str = False) -> None:
        self.gradients, self.fail_at, self.shared = 0, fail_at, shared
        self.buffers: dict[str, np.ndarray] = {}
        self.meets = 0

    def sum_buffer(self, count: int) -> np.ndarray | None:
        """With `shared`: memory of its own, as ranks on one machine get (the run writes its gradient there)."""
        if not self.shared:
            return None
        self.summed = np.zeros(count, dtype=np.float32)
        return self.summed

    def update_slice(self, count: int) -> tuple[int, int] | None:
        return (0, count) if self.shared == "sharded" else None

    def shared_buffer(self, name: str, count: int) -> np.ndarray:
        self.buffers[name] = np.full(count, np.nan, dtype=np.float32)  # (undefined until a rank writes its part)
        return self.buffers[name]

    def meet(self, values: np.ndarray | None = None) -> None:
        self.meets += 1

    def gather_sum(self, buf: np.ndarray) -> None:
        np.copyto(buf, self.summed)

    def sum_in_place(self, buf: np.ndarray, extra: np.ndarray | None = None, shard: bool = False) -> None:
        assert not shard or self.shared == "sharded"  # (the per-step path sums it all)
        self.gradients += buf.dtype == np.float32  # (the others are float64: a run's losses)
        if self.gradients == self.fail_at:
            raise RuntimeError(f"the ranks' sum of gradient {self.gradients} failed")
        np.add(buf, buf, out=buf)
        if extra is not None:
            np.add(extra, extra, out=extra)

    def gather_object(self, obj):
        return [obj, obj]


@pytest.mark.parametrize("shared", [False, True, "sharded"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_rank_of_a_data_parallel_job_runs_natively_as_on_the_per_step_path(compiled, threads, shared,
                                                                             monkeypatch):
    """Rank 0's part of each global batch (its images' dropout and crop by their index in the whole batch, the
    loss scaled by the whole batch), the gradient summed with the peer's between the backward pass and the
    update (in flat_grads, or in the comm's own buffer; or sharded, the weights, the snapshot and the optimizer's
    state in the comm's shared buffers): the per-step path's weights bit for bit."""
    x, y = images()
    monkeypatch.setattr(steploop, "RUN_SECONDS", 60.0)  # (runs of many steps, on a loaded machine too)
    twins: list[Twin] = []
    monkeypatch.setattr(train_mod, "world", lambda: twins.append(Twin(shared=shared)) or twins[-1])
    runs = assert_same_training(compiled, threads, x, y, optimizer="adam", lr=0.003, crop=1, flip=True, jitter=0.2,
                                weight_decay=0.003, batch=24)
    assert max(runs) > 1
    # (sharded: the native runs met twice a step, and trained on the comm's shared buffers, which start NaN)
    assert (twins[0].meets > 2 * len(runs)) == (shared == "sharded")
    monkeypatch.setattr(train_mod, "world", Local)
    alone = trained(compiled, threads, True, x, y, optimizer="adam", lr=0.003, batch=24)[0]
    monkeypatch.setattr(train_mod, "world", lambda: Twin(shared=shared))
    twin = trained(compiled, threads, True, x, y, optimizer="adam", lr=0.003, batch=24)[0]
    assert not np.array_equal(alone.flat_params, twin.flat_params)  # (the sum did act)


def test_a_failing_sum_of_the_ranks_ends_the_run_and_is_raised(compiled, monkeypatch):
    x, y = images()
    twin = Twin(fail_at=3)
    monkeypatch.setattr(train_mod, "world", lambda: twin)
    model = model_with(compiled, 2, True)
    with pytest.raises(RuntimeError, match="the ranks' sum of gradient 3 failed") as e:
        model.fit(x, y, epochs=1, batch=16, seed=3, optimizer="sgd", lr=0.05, progress=False)
    assert any(entry.name == "_sum_ranks" for entry in e.traceback)  # (raised in the run's callback)


@pytest.mark.parametrize("shared", [False, True, "sharded"])
def test_a_rank_stops_at_a_nan_as_on_the_per_step_path(compiled, shared, monkeypatch):
    """The same step, message, weights and gradient (copied back from the comm's buffer) as the per-step path."""
    x, y = images()
    monkeypatch.setattr(train_mod, "world", lambda: Twin(shared=shared))
    stops = []
    for native in (True, False):
        model = model_with(compiled, 2, native)
        with pytest.raises(TrainingStopped) as e:
            model.fit(x, y, epochs=3, batch=16, optimizer="sgd", lr=1e30, seed=3, progress=False)
        stops.append((str(e.value), model.flat_params.copy(), model.flat_grads.copy()))
    assert stops[0][0] == stops[1][0]
    np.testing.assert_array_equal(stops[0][1], stops[1][1])
    np.testing.assert_array_equal(stops[0][2], stops[1][2])
