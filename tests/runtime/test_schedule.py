"""Learning-rate schedules: hand-derived rates and torch.optim.lr_scheduler stepped once per training step."""

from __future__ import annotations

import math

import pytest

from cnnc_runtime.schedule import Schedule, make_schedule, parse


def rates(schedule: Schedule, steps_per_epoch: int, epochs: int, lr: float = 1.0) -> list[float]:
    total = steps_per_epoch * epochs
    return [lr * schedule.factor(t, steps_per_epoch, total) for t in range(total)]


def test_constant_and_exponential_by_hand():
    assert rates(make_schedule(None), 2, 2) == [1.0] * 4
    assert rates(make_schedule(None, lr_decay=0.5), 2, 3) == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_step_by_hand():
    got = rates(make_schedule("step(every=2, gamma=0.5)"), 1, 6)
    assert got == [1, 1, 0.5, 0.5, 0.25, 0.25]


def test_cosine_by_hand_reaches_zero_at_the_end_of_the_run():
    got = rates(make_schedule("cosine"), 2, 2)  # 4 steps: (1 + cos(pi t / 4)) / 2
    assert got == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])
    assert make_schedule("cosine").factor(4, 2, 4) == pytest.approx(0.0)


def test_warmup_climbs_linearly_then_hands_over():
    got = rates(make_schedule("step(1, 0.1)", warmup=1), 4, 3)
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1])


def _torch_rates(torch, main, warmup_steps: int, total: int, lr: float) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = main(opt)
    if warmup_steps:
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warmup_steps)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, main(opt)], milestones=[warmup_steps])
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("spec,warmup", [("cosine", 0), ("cosine", 2), ("step(every=2, gamma=0.3)", 0),
                                         ("step(every=2, gamma=0.3)", 1), ("constant", 3)])
def test_matches_torch_lr_scheduler(spec, warmup):
    """Every step's rate against PyTorch's schedulers stepped per step (rel. 1e-9: the same formulas in double)."""
    torch = pytest.importorskip("torch")
    spe, epochs, lr = 5, 7, 0.1
    total, warm = spe * epochs, warmup * spe
    name, args = parse(spec)
    if name == "cosine":
        main = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm)  # noqa: E731
    elif name == "step":
        main = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=args["every"] * spe,  # noqa: E731
                                                           gamma=args["gamma"])
    else:
        main = lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)  # noqa: E731
    expected = _torch_rates(torch, main, warm, total, lr)
    assert rates(make_schedule(spec, warmup=warmup), spe, epochs, lr) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_exponential_matches_torch_exponential_lr_per_epoch():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
    expected = []
    for _ in range(4):
        expected += [opt.param_groups[0]["lr"]] * 3
        opt.step()
        sched.step()
    assert rates(make_schedule(None, lr_decay=0.8), 3, 4, 0.1) == pytest.approx(expected, rel=1e-12)


def test_parse_and_errors():
    assert parse("step(30)") == ("step", {"every": 30})
    assert parse(" step( every=3 , gamma=0.5 ) ") == ("step", {"every": 3, "gamma": 0.5})
    assert parse("cosine") == ("cosine", {})
    assert make_schedule({"name": "step", "every": 3}).args == (("every", 3), ("gamma", 0.1))
    for bad, message in [("cosin", "unknown schedule 'cosin'"), ("step", "needs every"),
                         ("step(every=0)", "every must be a positive integer"),
                         ("step(2, gamma=2)", "gamma must be a factor"), ("cosine(3)", "takes nothing"),
                         ("step(x)", "'x' is not a number"), ("step(2", "cannot read schedule")]:
        with pytest.raises(ValueError, match=message):
            make_schedule(bad)
    with pytest.raises(ValueError, match="cannot go with schedule cosine"):
        make_schedule("cosine", lr_decay=0.9)
    with pytest.raises(ValueError, match="warmup must be"):
        make_schedule("cosine", warmup=-1)
