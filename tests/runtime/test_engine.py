"""The engine's public step API, as a training loop of one's own (or the benchmark) uses it.

``gradients`` computes one step's gradient into ``flat_grads``, ``update``
applies an optimizer, ``add_noise`` jitters inputs, ``infer_into`` runs
inference into a caller's buffer; each checks what it is given.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest

from cnnc_runtime import engine
from cnnc_runtime.engine import Engine
from cnnc_runtime.optimizers import SGD
from tests.reference import MLP, MLP_NO_DROPOUT, NETWORKS, _compiled, build

RUNTIME = Path(engine.__file__).resolve().parent


@pytest.fixture(scope="module")
def mlp():
    return build(MLP_NO_DROPOUT)


def batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 64)).astype(np.float32), rng.integers(0, 10, n)


def with_threads(text: str, threads: int) -> Engine:
    manifest, obj = _compiled(text, False, True)
    return Engine(copy.deepcopy(manifest), obj, threads=threads)


def test_a_training_loop_of_ones_own_matches_fit():
    """gradients + update, a step at a time, give fit's weights exactly (sgd; a batch of one image repeated, so
    fit's shuffling cannot change it)."""
    x, y = np.repeat(batch(1)[0], 48, axis=0), np.full(48, 3)
    mine, theirs = build(MLP_NO_DROPOUT), build(MLP_NO_DROPOUT)
    opt = SGD(lr=0.1)
    targets = mine.check_targets(y, len(x), "cross_entropy")
    for _ in range(3):
        with mine.lock:
            value = mine.gradients(mine.prepare(x), targets, "cross_entropy")
            mine.update(opt)
        assert np.isfinite(value)
    theirs.fit(x, y, epochs=3, batch=48, optimizer="sgd", lr=0.1, progress=False)
    np.testing.assert_array_equal(mine.flat_params, theirs.flat_params)


def test_gradients_are_value_and_grad(mlp):
    x, y = batch(40, seed=1)
    loss, grads = mlp.value_and_grad(x, y, seed=3)
    out, losses = np.empty((40, 10), np.float32), np.empty(40, np.float32)
    value = mlp.gradients(x, mlp.check_targets(y, 40, "cross_entropy"), "cross_entropy", seed=3, out=out,
                          losses=losses)
    assert value == loss
    assert value == pytest.approx(float(losses.mean(dtype=np.float64)))
    for name, g in grads.items():
        offset = next(p for p in mlp.manifest["params"] if p["name"] == name)["offset"]
        np.testing.assert_array_equal(mlp.flat_grads[offset:offset + g.size], g.ravel())


def test_mse_gradients_are_the_mean_over_images_and_outputs(mlp):
    x, y = batch(8, seed=2)
    targets = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    out = np.empty((8, 10), np.float32)
    value = mlp.gradients(x, targets, "mse", out=out)
    assert value == pytest.approx(float(((out.astype(np.float64) - targets) ** 2).mean()), rel=1e-6)


@pytest.mark.parametrize("x, targets, loss, message", [
    (np.zeros((4, 63), np.float32), np.zeros(4, np.int32), "cross_entropy", r"batch of shape \(N, 64\)"),
    (np.zeros((4, 64), np.float64), np.zeros(4, np.int32), "cross_entropy", r"float32 batch"),
    (np.zeros((0, 64), np.float32), np.zeros(0, np.int32), "cross_entropy", r"batch of shape"),
    (np.zeros((4, 128), np.float32)[:, ::2], np.zeros(4, np.int32), "cross_entropy", r"contiguous"),
    (np.zeros((4, 64), np.float32), np.zeros(4, np.int64), "cross_entropy", r"int32 labels of shape \(4,\) in 0\.\.9"),
    (np.zeros((4, 64), np.float32), np.zeros(5, np.int32), "cross_entropy", r"shape \(4,\)"),
    (np.zeros((4, 64), np.float32), np.full(4, 10, np.int32), "cross_entropy", r"in 0\.\.9"),
    (np.zeros((4, 64), np.float32), np.full(4, -1, np.int32), "cross_entropy", r"in 0\.\.9"),
    (np.zeros((4, 64), np.float32), np.zeros(4, np.int32), "mse", r"mse targets .* float32 targets of shape \(4, 10\)"),
    (np.zeros((4, 64), np.float32), np.zeros(4, np.int32), "hinge", r"unknown loss 'hinge'"),
])
def test_gradients_refuse_what_native_code_cannot_take(mlp, x, targets, loss, message):
    before = mlp.flat_grads.copy()
    with pytest.raises(ValueError, match=message):
        mlp.gradients(x, targets, loss)
    np.testing.assert_array_equal(mlp.flat_grads, before)


def test_gradients_check_the_buffers_they_write(mlp):
    x, y = batch(4)
    t = mlp.check_targets(y, 4, "cross_entropy")
    with pytest.raises(ValueError, match=r"`out` as a writable contiguous float32 array of shape \(4, 10\)"):
        mlp.gradients(x, t, "cross_entropy", out=np.empty((4, 9), np.float32))
    with pytest.raises(ValueError, match=r"`losses` .* shape \(4\)"):
        mlp.gradients(x, t, "cross_entropy", losses=np.empty(4, np.float64))
    frozen = x.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="batch"):  # prepare writes into x
        mlp.gradients(frozen, t, "cross_entropy", prepare=lambda t, a, b: None)


def test_prepare_fills_the_batch_where_it_runs(mlp):
    x, y = batch(64, seed=4)
    t = mlp.check_targets(y, 64, "cross_entropy")
    want = mlp.gradients(x, t, "cross_entropy")
    grads = mlp.flat_grads.copy()
    buf = mlp.batch_buffer(64)
    filled: list[tuple[int, int]] = []

    def prepare(thread: int, a: int, b: int) -> None:
        buf[a:b] = x[a:b]
        filled.append((a, b))

    assert mlp.gradients(buf, t, "cross_entropy", prepare=prepare) == want
    np.testing.assert_array_equal(mlp.flat_grads, grads)
    assert sorted(filled) == list(engine.shards(64))


def test_noise_added_a_range_at_a_time_is_the_noise_added_at_once(mlp):
    x = np.zeros((20, 64), np.float32)
    whole, parts = x.copy(), x.copy()
    mlp.add_noise(whole, 0.5, seed=11)
    mlp.add_noise(parts, 0.5, seed=11, rows=(0, 7))
    mlp.add_noise(parts, 0.5, seed=11, rows=(7, 20))
    np.testing.assert_array_equal(whole, parts)
    assert whole.std() == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="rows"):
        mlp.add_noise(parts, 0.5, seed=11, rows=(5, 21))
    with pytest.raises(ValueError, match="pool threads"):
        mlp.add_noise(parts, 0.5, seed=11, thread=mlp.threads)
    with pytest.raises(ValueError, match=r"shape \(N, 64\)"):
        mlp.add_noise(np.zeros((2, 64)), 0.5, seed=1)


def test_infer_into_writes_what_forward_returns():
    model = build(NETWORKS["lenet_modern"])
    x = np.random.default_rng(0).standard_normal((300, 1, 28, 28)).astype(np.float32)
    out = np.full((300, 10), np.nan, np.float32)
    assert model.infer_into(x, out) is out
    np.testing.assert_array_equal(out, model(x))
    with pytest.raises(ValueError, match=r"output of shape \(300, 10\), got float32 \(300, 9\)"):
        model.infer_into(x, np.empty((300, 9), np.float32))
    with pytest.raises(ValueError, match=r"infer_into needs a contiguous float32 batch of shape \(N, 1, 28, 28\) "
                                         r"\(the network's input: see prepare\), got float32 \(300, 1, 27, 28\)"):
        model.infer_into(x[:, :, :27], out)
    with pytest.raises(ValueError, match="infer_into needs"):  # uint8 images are not the network's input
        model.infer_into(np.zeros((300, 1, 28, 28), np.uint8), out)


def test_update_applies_the_optimizer_to_the_gradient(mlp):
    model = build(MLP)
    x, y = batch(16)
    model.gradients(x, model.check_targets(y, 16, "cross_entropy"), "cross_entropy")
    want = model.flat_params - np.float32(0.5) * model.flat_grads
    model.update(SGD(lr=0.5))
    np.testing.assert_array_equal(model.flat_params, want)


def _runtime_imports(module: str) -> set[str]:
    """The cnnc_runtime modules `module` imports, wherever in the file."""
    tree = ast.parse((RUNTIME / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnc_runtime"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("cnnc_runtime."))
    return found


def test_the_runtime_layers_only_point_down():
    """engine <- train <- model: the engine knows nothing of the loop, the loop nothing of the user-facing Model."""
    assert not {"train", "model", "settings"} & _runtime_imports("engine")
    assert "model" not in _runtime_imports("train")
    assert {"engine", "train"} <= _runtime_imports("model")
    assert not {"engine", "train", "model"} & _runtime_imports("settings")


def test_model_is_an_engine_with_fit():
    model = build(MLP_NO_DROPOUT)
    assert isinstance(model, Engine)
    assert not hasattr(Engine, "fit") and callable(model.fit) and callable(model.evaluate)


def test_the_parts_of_a_batch_add_up_to_the_whole_batch():
    """What each rank of a data-parallel step computes: images [lo, hi) of a batch of 64, with image0 = lo and
    whole = 64, give gradients and losses that sum to the whole batch's, dropout masks and all (float32 sums
    grouped differently: 1e-6)."""
    model = build(MLP)
    x, y = batch(64, seed=5)
    t = model.check_targets(y, 64, "cross_entropy")
    value = model.gradients(x, t, "cross_entropy", seed=9)
    want = model.flat_grads.astype(np.float64)
    total, parts = 0.0, []
    for lo, hi in [(0, 21), (21, 43), (43, 64)]:
        total += model.gradients(x[lo:hi], t[lo:hi], "cross_entropy", seed=9, image0=lo, whole=64)
        parts.append(model.flat_grads.astype(np.float64))
    assert total == pytest.approx(value, rel=1e-6)
    np.testing.assert_allclose(sum(parts), want, rtol=0, atol=1e-6 * np.abs(want).max())
    model.gradients(x[21:43], t[21:43], "cross_entropy", seed=9, whole=64)  # image0 0: the masks of images 0..21
    assert not np.allclose(model.flat_grads, parts[1], rtol=0, atol=1e-3 * np.abs(want).max())
    with pytest.raises(ValueError, match=r"image0 >= 0 and image0 \+ N <= whole \(N = 22\)"):
        model.gradients(x[21:43], t[21:43], "cross_entropy", image0=21, whole=42)
    with pytest.raises(ValueError, match=r"image0 >= 0"):
        model.gradients(x[21:43], t[21:43], "cross_entropy", image0=-1, whole=64)


def test_a_part_of_a_batch_is_cut_into_the_whole_batchs_shards():
    """A rank's share of a step runs the shards one process cuts the whole batch into, cut at the share's edges
    (never smaller shards of its own); a whole batch runs ``shards``, chunk by chunk."""
    assert engine.shards(64) == ((0, 32), (32, 64))
    assert engine.part_shards(0, 32, 32, 64, 256) == ((0, 32),)  # not shards(32), two of 16
    assert engine.part_shards(0, 22, 21, 64, 256) == ((0, 11), (11, 22))  # images 21..43: cut at 32
    assert engine.part_shards(0, 100, 0, 100, 256) == engine.shards(100)
    assert engine.part_shards(256, 300, 0, 300, 256) == engine.shards(44)  # a whole batch's second chunk
    assert engine.part_shards(0, 50, 250, 300, 256) == ((0, 6), (6, 30), (30, 50))  # across a chunk's end


def test_two_halves_of_a_batch_add_up_to_the_whole_batch_bit_for_bit():
    """Two ranks of one thread at batch 64 each compute one of the whole batch's two shards: their sum (what the
    all-reduce computes) is the one addition one process makes, dropout masks and all."""
    model = with_threads(MLP, 1)
    x, y = batch(64, seed=6)
    t = model.check_targets(y, 64, "cross_entropy")
    model.gradients(x, t, "cross_entropy", seed=9)
    want = model.flat_grads.copy()
    model.gradients(x[:32], t[:32], "cross_entropy", seed=9, whole=64)
    first = model.flat_grads.copy()
    model.gradients(x[32:], t[32:], "cross_entropy", seed=9, image0=32, whole=64)
    np.testing.assert_array_equal(first + model.flat_grads, want)


def test_a_part_in_one_piece_is_cut_in_two_for_a_model_of_two_threads():
    """A rank's share that is one of the whole batch's shards runs as that shard on one thread, and as two shards
    on two threads, so both threads work on it."""
    x, y = batch(64, seed=7)

    def shards_run(threads: int) -> list[tuple[int, int]]:
        model = with_threads(MLP, threads)
        buf, filled = model.batch_buffer(32), []

        def prepare(thread: int, a: int, b: int) -> None:
            buf[a:b] = x[32 + a:32 + b]
            filled.append((a, b))

        t = model.check_targets(y[32:], 32, "cross_entropy")
        model.gradients(buf, t, "cross_entropy", prepare=prepare, image0=32, whole=64)
        return sorted(filled)

    assert shards_run(1) == [(0, 32)]
    assert shards_run(2) == list(engine.shards(32))


def test_noise_of_a_part_is_the_noise_of_its_images_in_the_whole_batch(mlp):
    whole, part = np.zeros((20, 64), np.float32), np.zeros((13, 64), np.float32)
    mlp.add_noise(whole, 0.5, seed=11)
    mlp.add_noise(part, 0.5, seed=11, image0=7)
    np.testing.assert_array_equal(part, whole[7:])
    with pytest.raises(ValueError, match="image0"):
        mlp.add_noise(part, 0.5, seed=11, image0=-7)


def test_the_native_gatherer_gives_the_batches_of_the_numpy_rule(mlp):
    """fit's gather, a thread's share at a time, writes what Inputs.batch writes (8x8 uint8 images into the
    64 flat inputs, normalized); positions and ranges outside what was selected are refused."""
    images = np.random.default_rng(2).integers(0, 256, (20, 8, 8), dtype=np.uint8)
    inputs = engine.Inputs(images, mlp.input_shape, {"mean": 0.5, "std": 0.2}).subset(np.arange(19, 1, -1))
    buf = mlp.batch_buffer(8)
    gather = mlp.gatherer(inputs, buf)
    idx = np.array([0, 17, 3, 3, 9, 12], np.int64)
    gather.select(idx)
    gather(3, 6)
    gather(0, 3)
    want = inputs.batch(idx, np.empty((6, *mlp.input_shape), np.float32))
    np.testing.assert_array_equal(buf[:6], want)
    for bad in (np.array([18]), np.array([-1]), np.arange(9)):
        with pytest.raises(ValueError, match="gather needs"):
            gather.select(bad)
    with pytest.raises(ValueError, match="not a range"):
        gather(4, 7)
