"""Optimizers on flat buffers: hand-computed steps, torch.optim agreement, checkpoints, no allocation."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from cnnc_runtime.optimizers import (
    OPTIMIZERS,
    SGD,
    Adam,
    AdamW,
    Momentum,
    Nesterov,
    Optimizer,
    RMSProp,
    add_weight_decay,
    clip_grad_norm,
    make_optimizer,
)

KINDS = list(OPTIMIZERS)


def _run(opt: Optimizer, w0, grads) -> list[list[float]]:
    w = np.array(w0, np.float32)
    trajectory = []
    for g in grads:
        opt.step(w, np.array(g, np.float32))
        trajectory.append(w.tolist())
    return trajectory


def test_sgd_by_hand():
    # w -= 0.1 g with g = (0.5, -1): each step moves (-0.05, +0.1)
    got = _run(SGD(0.1), [1.0, -2.0], [[0.5, -1.0]] * 3)
    np.testing.assert_allclose(got, [[0.95, -1.9], [0.9, -1.8], [0.85, -1.7]], rtol=1e-6)


def test_momentum_by_hand():
    # constant g: v = g, 1.9 g, 2.71 g; w = w0 - 0.1 * (1, 2.9, 5.61) g
    g = [1.0, -2.0]
    got = _run(Momentum(0.1, beta=0.9), [0.0, 0.0], [g] * 3)
    np.testing.assert_allclose(got, [[-0.1, 0.2], [-0.29, 0.58], [-0.561, 1.122]], rtol=1e-6)


def test_momentum_matches_the_lecture_form_at_constant_lr():
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((6, 4)).astype(np.float32)
    heavy = _run(Momentum(0.05, 0.8), np.zeros(4), grads)
    w, v = np.zeros(4), np.zeros(4)
    lecture = []
    for g in grads:
        v = 0.8 * v - 0.05 * g
        w = w + v
        lecture.append(w.tolist())
    np.testing.assert_allclose(heavy, lecture, rtol=1e-5, atol=1e-7)


def test_rmsprop_by_hand():
    # constant g: s = (0.1, 0.19, 0.271) g^2, so each step is lr sign(g) / sqrt(0.1), / sqrt(0.19), / sqrt(0.271)
    steps = [0.01 / math.sqrt(0.1), 0.01 / math.sqrt(0.19), 0.01 / math.sqrt(0.271)]  # 0.0316, 0.0229, 0.0192
    got = _run(RMSProp(0.01, beta=0.9, eps=1e-30), [1.0, 1.0], [[3.0, -0.5]] * 3)
    expected = [[1 - sum(steps[: k + 1]), 1 + sum(steps[: k + 1])] for k in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # eps enters as sqrt(s) + eps: with g = 1, s = 0.1, step = lr / (sqrt(0.1) + eps)
    np.testing.assert_allclose(_run(RMSProp(1.0, 0.9, eps=0.5), [0.0], [[1.0]]), [[-1 / (math.sqrt(0.1) + 0.5)]])


def test_adam_by_hand():
    # bias correction makes m^ = g and v^ = g^2 under a constant gradient: each step is lr sign(g)
    got = _run(Adam(0.01, eps=1e-30), [1.0, 1.0], [[4.0, -0.25]] * 3)
    np.testing.assert_allclose(got, [[0.99, 1.01], [0.98, 1.02], [0.97, 1.03]], rtol=1e-6)
    # g = 1 then -1: m2 = 0.09 - 0.1 = -0.01, m^2 = -0.01 / 0.19; v2 = 0.001999 = 1 - 0.999^2, so v^2 = 1
    got = _run(Adam(0.1, eps=1e-30), [0.0], [[1.0], [-1.0]])
    np.testing.assert_allclose(got, [[-0.1], [-0.1 + 0.1 * 0.01 / 0.19]], rtol=1e-6)


def test_nesterov_by_hand():
    # constant g: v = g, 1.9 g; steps lr (g + 0.9 v) = 0.1 (1.9, 2.71) g
    got = _run(Nesterov(0.1, beta=0.9), [0.0], [[1.0]] * 2)
    np.testing.assert_allclose(got, [[-0.19], [-0.19 - 0.271]], rtol=1e-6)


def test_adamw_decays_before_the_adam_step_and_only_under_the_mask():
    # one step with g = 1: Adam's step is lr; the decay first scales w by 1 - lr wd where the mask is 1
    opt = AdamW(0.1, eps=1e-30, weight_decay=0.5)
    w = np.array([2.0, 2.0], np.float32)
    opt.step(w, np.ones(2, np.float32), np.array([1.0, 0.0], np.float32))
    np.testing.assert_allclose(w, [2.0 * (1 - 0.05) - 0.1, 2.0 - 0.1], rtol=1e-6)


def test_steps_keep_float32_and_update_in_place():
    for name in KINDS:
        opt = make_optimizer(name, lr=0.1)
        w = np.ones(5, np.float32)
        before = w.ctypes.data
        opt.step(w, np.full(5, 0.5, np.float32))
        assert w.dtype == np.float32 and w.ctypes.data == before and (w < 1).all()
        assert all(v.dtype == np.float32 for v in opt.state_dict().values() if isinstance(v, np.ndarray))


@pytest.mark.parametrize("name", KINDS)
def test_a_step_allocates_nothing(name):
    n = 1 << 20
    w = np.zeros(n, np.float32)
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    opt = make_optimizer(name, lr=1e-3)
    opt.step(w, g)  # allocates the state
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            opt.step(w, g)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - base < n  # a single temporary would be 4n bytes


def _torch_equivalents(torch):
    return [
        (lambda: SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda: Momentum(0.05, beta=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        (lambda: RMSProp(0.01, beta=0.95, eps=1e-6), lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.95, eps=1e-6)),
        (lambda: Adam(0.01, 0.8, 0.99, 1e-7), lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-7)),
        (lambda: Nesterov(0.05, beta=0.8),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True)),
        (lambda: AdamW(0.01, 0.8, 0.99, 1e-7, weight_decay=0.3),
         lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.3)),
    ]


@pytest.mark.parametrize("which", ["sgd", "momentum", "rmsprop", "adam", "nesterov", "adamw"])
def test_matches_torch_optim(which):
    """Step for step against torch.optim on the same gradients: rtol 1e-5, atol 1e-6 (float32 rounding only)."""
    torch = pytest.importorskip("torch")
    index = ["sgd", "momentum", "rmsprop", "adam", "nesterov", "adamw"].index(which)
    ours_factory, torch_factory = _torch_equivalents(torch)[index]
    rng = np.random.default_rng(42)
    w0 = rng.standard_normal(64).astype(np.float32)
    grads = rng.standard_normal((5, 64)).astype(np.float32)
    ours, w = ours_factory(), w0.copy()
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    theirs = torch_factory([p])
    for g in grads:
        ours.step(w, g)
        p.grad = torch.from_numpy(g.copy())
        theirs.step()
        np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", KINDS)
def test_state_dict_round_trip_continues_identically(name, tmp_path):
    from cnnc_runtime.fileio import atomic_save_npz

    rng = np.random.default_rng(7)
    grads = rng.standard_normal((6, 32)).astype(np.float32)
    a = make_optimizer(name, lr=0.02)
    w = rng.standard_normal(32).astype(np.float32)
    for g in grads[:3]:
        a.step(w, g)
    atomic_save_npz(tmp_path / "opt", {k: np.asarray(v) for k, v in a.state_dict().items()})
    with np.load(tmp_path / "opt") as z:
        saved = dict(z)
    b = make_optimizer(name, lr=0.5)  # hyperparameters come from the checkpoint
    b.load_state_dict(saved)
    assert b.t == 3 and b.lr == 0.02
    w_b = w.copy()
    for g in grads[3:]:
        a.step(w, g)
        b.step(w_b, g)
    np.testing.assert_array_equal(w, w_b)


def test_state_dict_is_a_copy_and_reset_forgets():
    opt = Adam(0.1)
    w = np.zeros(3, np.float32)
    opt.step(w, np.ones(3, np.float32))
    d = opt.state_dict()
    assert set(d) == {"lr", "beta1", "beta2", "eps", "t", "m", "v"}
    d["m"][:] = 99
    assert opt.state_dict()["m"][0] != 99
    opt.reset()
    assert opt.t == 0 and set(opt.state_dict()) == {"lr", "beta1", "beta2", "eps", "t"}
    opt.step(np.zeros(5, np.float32), np.ones(5, np.float32))  # a new size is fine after reset


def test_load_state_dict_errors():
    with pytest.raises(ValueError, match="SGD state has no"):
        SGD(0.1).load_state_dict(Adam(0.1).state_dict() | {"m": np.zeros(2), "v": np.zeros(2)})
    with pytest.raises(ValueError, match="all of"):
        Adam(0.1).load_state_dict({"m": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="one size"):
        Adam(0.1).load_state_dict({"m": np.zeros(2, np.float32), "v": np.zeros(3, np.float32)})
    opt = Momentum(0.1)
    opt.step(np.zeros(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match="4 parameters"):
        opt.step(np.zeros(5, np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="differ"):
        SGD(0.1).step(np.zeros(4, np.float32), np.ones(3, np.float32))


def test_make_optimizer():
    assert isinstance(make_optimizer("Adam", lr=1e-3, beta2=0.98), Adam)
    assert make_optimizer("momentum", lr=0.1, beta=0.5).beta == 0.5
    assert make_optimizer("adamw").weight_decay == 0.01 and make_optimizer("adam").lr == 0.001  # the defaults
    with pytest.raises(ValueError, match="sgd, momentum, nesterov, rmsprop, adam, adamw"):
        make_optimizer("adagrad", lr=0.1)
    with pytest.raises(ValueError, match="positive"):
        make_optimizer("sgd", lr=0)


def test_add_weight_decay():
    params = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
    mask = np.array([1, 1, 0, 1], np.float32)  # third entry is a bias
    grads = np.full(4, 0.25, np.float32)
    penalty = add_weight_decay(params, grads, mask, 0.1)
    assert penalty == pytest.approx(0.1 * (1 + 4 + 0.25))
    np.testing.assert_allclose(grads, [0.25 + 0.2, 0.25 - 0.4, 0.25, 0.25 + 0.1], rtol=1e-6)
    scratch = np.empty_like(params)
    assert add_weight_decay(params, grads, mask, 0.0, out=scratch) == 0.0
    before = grads.copy()
    add_weight_decay(params, grads, mask, 0.1, out=scratch)
    np.testing.assert_allclose(grads - before, [0.2, -0.4, 0.0, 0.1], rtol=1e-6)


@pytest.fixture(scope="module")
def compiled():
    import cnnc

    return cnnc.compile_string("network tiny { input x: 3\n y = x -> dense(2) }", cache=False)


@pytest.mark.parametrize("name", KINDS)
def test_native_update_gives_the_same_bits_as_numpy(compiled, name):
    """The model's update_KIND loop against the numpy rule: same float32 operations, same order, same bits."""
    rng = np.random.default_rng(3)
    size = 1003  # not a multiple of any vector width: the loop's tail runs too
    start = rng.standard_normal(size).astype(np.float32)
    mask = (rng.random(size) < 0.8).astype(np.float32)
    native, plain = make_optimizer(name, lr=0.01), make_optimizer(name, lr=0.01)
    assert compiled.manifest["updates"][name] == list(native.constant_names)  # the code lists them alike
    native.use_native(compiled.native_update(native))
    assert native._native is not None
    p_native, p_plain = start.copy(), start.copy()
    for step in range(5):
        grads = (rng.standard_normal(size) * 10.0 ** rng.integers(-6, 2, size)).astype(np.float32)
        native.lr = plain.lr = 0.01 * 0.5**step  # a schedule: constants change between steps
        native.step(p_native, grads, mask)
        plain.step(p_plain, grads, mask)
        np.testing.assert_array_equal(p_native, p_plain)
    assert native._pointers is not None  # (the native loop ran)
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(native.state_dict()[key], value)
    # state restored from a checkpoint: new buffers, and the native loop must use them
    restored = make_optimizer(name, lr=plain.lr)
    restored.use_native(compiled.native_update(restored))
    restored.load_state_dict(plain.state_dict())
    grads = rng.standard_normal(size).astype(np.float32)
    restored.step(p_native, grads, mask)
    plain.step(p_plain, grads, mask)
    np.testing.assert_array_equal(p_native, p_plain)


def test_native_update_falls_back_to_numpy_for_buffers_it_cannot_take(compiled):
    opt = make_optimizer("adam", lr=0.1)
    opt.use_native(compiled.native_update(opt))
    strided = np.ones(20, dtype=np.float32)[::2]  # not contiguous: the numpy rule, never the native loop
    opt.step(strided, np.ones(10, dtype=np.float32))
    np.testing.assert_allclose(strided, 0.9, rtol=1e-6)


def test_a_subclass_keeps_its_own_rule(compiled):
    class Frozen(SGD):
        def _update(self, params, grads, tmp):
            pass

    opt = Frozen(lr=0.5)
    assert opt.native_kind == "" and compiled.native_update(opt) is None
    params = np.ones(4, dtype=np.float32)
    opt.use_native(compiled.native_update(opt))
    opt.step(params, np.ones(4, dtype=np.float32))
    np.testing.assert_array_equal(params, 1.0)


def test_a_native_update_keeps_its_code_alive():
    """An optimizer may outlive the model whose loop it runs: the loop holds the code."""
    import gc

    import cnnc

    model = cnnc.compile_string("network tiny2 { input x: 3\n y = x -> dense(2) }", cache=False)
    opt = make_optimizer("momentum", lr=0.1)
    opt.use_native(model.native_update(opt))
    del model
    gc.collect()
    params = np.ones(37, dtype=np.float32)
    opt.step(params, np.ones(37, dtype=np.float32))
    np.testing.assert_allclose(params, 0.9, rtol=1e-6)


def test_fit_runs_the_native_update_and_unbinds_it(compiled):
    seen = []
    opt = make_optimizer("adam", lr=0.01)
    x = np.random.default_rng(0).standard_normal((32, 3)).astype(np.float32)
    compiled.fit(x, np.arange(32) % 2, epochs=1, batch=8, optimizer=opt, progress=False, validation=0.0,
                 on_epoch=lambda e: seen.append(opt._native))
    assert seen and seen[0] is compiled.native_update(opt)
    assert opt._native is None


def test_code_without_the_loop_or_with_other_constants_gets_none(compiled):
    opt = make_optimizer("adam", lr=0.01)
    updates = compiled.manifest["updates"]
    try:
        compiled.manifest["updates"] = {**updates, "adam": list(reversed(updates["adam"]))}
        assert compiled.native_update(opt) is None
        compiled.manifest["updates"] = {}
        assert compiled.native_update(opt) is None
    finally:
        compiled.manifest["updates"] = updates


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    """Against torch.nn.utils.clip_grad_norm_ over three tensors laid end to end (rel. 1e-6)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal(s).astype(np.float32) for s in (7, 30, 4)]
    tensors = [torch.nn.Parameter(torch.zeros(len(p))) for p in parts]
    for t, p in zip(tensors, parts):
        t.grad = torch.from_numpy(p.copy())
    want = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    flat = np.concatenate(parts)
    norm = clip_grad_norm(flat, max_norm)
    assert norm == pytest.approx(float(want), rel=1e-6)
    np.testing.assert_allclose(flat, np.concatenate([t.grad.numpy() for t in tensors]), rtol=1e-6)
    if max_norm < norm:
        assert np.linalg.norm(flat.astype(np.float64)) == pytest.approx(max_norm, rel=1e-5)
