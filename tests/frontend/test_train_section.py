"""The ``train { ... }`` section: every setting and its forms land in the graph's train dict (and from there in
the runtime's Settings); mistakes are reported at the right line and column.
"""

from __future__ import annotations

import pytest

from cnnc.errors import CnnError
from cnnc.pipeline import check_source
from cnnc_runtime.settings import Settings, settings_from


def trained(settings: str) -> str:
    """A valid network and a train section whose settings start on line 6, column 5."""
    return f"network n {{\n    input x: 4\n    y = x -> dense(2)\n}}\ntrain {{\n{settings}}}\n"


def train_of(settings: str) -> dict:
    return check_source(trained(settings), "t.cnn").graph["train"]


def expect(settings: str, where: str, message: str) -> None:
    with pytest.raises(CnnError) as info:
        check_source(trained(settings), "t.cnn")
    e = info.value
    assert str(e).splitlines()[0] == f"t.cnn:{where}: error: {message}"
    assert e.message == message
    lines = str(e).splitlines()
    assert len(lines) == 3  # the source line and a caret under the column
    col = int(where.split(":")[1])
    assert lines[2].index("^") == col - 1


FULL = """\
    data "data/mnist"
    normalize(mean=0.1307, std=0.3081)
    loss cross_entropy
    optimizer adam(lr=0.002, beta1=0.8, beta2=0.99, eps=1e-7)
    lr_decay 0.85
    batch 64
    epochs 20
    seed 1
    weight_decay 0.0001
    jitter 0.1
    validation 0.1
    early_stop(patience=3, min_delta=0.001)
    restarts 3
    max_steps 10000
    min_improvement 0.0001
"""


def test_every_setting_lands_in_the_train_dict():
    assert train_of(FULL) == {
        "data": "data/mnist",
        "normalize": {"mean": 0.1307, "std": 0.3081},
        "loss": "cross_entropy",
        "optimizer": {"name": "adam", "lr": 0.002, "beta1": 0.8, "beta2": 0.99, "eps": 1e-7},
        "lr_decay": 0.85,
        "batch": 64,
        "epochs": 20,
        "seed": 1,
        "weight_decay": 0.0001,
        "jitter": 0.1,
        "validation": 0.1,
        "early_stop": {"patience": 3, "min_delta": 0.001},
        "restarts": 3,
        "max_steps": 10000,
        "min_improvement": 0.0001,
    }


def test_the_train_dict_becomes_the_runtime_settings():
    s = settings_from(train_of(FULL))
    assert s == Settings(epochs=20, batch=64, loss="cross_entropy", optimizer="adam", lr=0.002,
                         optimizer_args={"beta1": 0.8, "beta2": 0.99, "eps": 1e-7}, validation=0.1,
                         patience=3, min_delta=0.001, jitter=0.1, weight_decay=0.0001, restarts=3, seed=1,
                         max_steps=10000, min_improvement=0.0001, lr_decay=0.85)
    # explicit arguments win; None means "not given"
    s = settings_from(train_of(FULL), lr=0.5, epochs=None, lr_decay=1.0, max_steps=7)
    assert (s.lr, s.epochs, s.lr_decay, s.max_steps) == (0.5, 20, 1.0, 7)


def test_an_empty_section_gives_the_defaults():
    assert train_of("") == {}
    assert settings_from({}) == Settings()
    assert check_source("network n {\n    input x: 4\n    y = x -> relu\n}\n").graph["train"] == {}


@pytest.mark.parametrize("setting, value", [
    ("normalize(mean=0.5, std=0.25)", {"mean": 0.5, "std": 0.25}),
    ("normalize(0.5, 0.25)", {"mean": 0.5, "std": 0.25}),
    ("normalize(std=2, mean=-1)", {"mean": -1.0, "std": 2.0}),
    ("normalize(mean=0, std=1)", {"mean": 0.0, "std": 1.0}),
    ("normalize(0.5, std=3)", {"mean": 0.5, "std": 3.0}),
    ("normalize(mean=[0.5], std=[3])", {"mean": [0.5], "std": [3.0]}),  # one per channel (the input has 1 here)
])
def test_normalize_forms(setting, value):
    got = train_of(f"    {setting}\n")["normalize"]
    assert got == value
    assert all(type(x) is float for v in got.values() for x in (v if isinstance(v, list) else [v]))


@pytest.mark.parametrize("setting, value", [
    ("early_stop 4", {"patience": 4, "min_delta": 0.0}),
    ("early_stop(patience=2)", {"patience": 2, "min_delta": 0.0}),
    ("early_stop(min_delta=0.01)", {"patience": 5, "min_delta": 0.01}),
    ("early_stop(3, 0.5)", {"patience": 3, "min_delta": 0.5}),
    ("early_stop(patience=3, min_delta=0)", {"patience": 3, "min_delta": 0.0}),
    ("early_stop()", {"patience": 5, "min_delta": 0.0}),
])
def test_early_stop_forms(setting, value):
    got = train_of(f"    {setting}\n")["early_stop"]
    assert got == value
    assert type(got["min_delta"]) is float
    s = settings_from({"early_stop": got})
    assert (s.patience, s.min_delta) == (value["patience"], value["min_delta"])


@pytest.mark.parametrize("setting, key, value", [
    ("lr_decay 0.5", "lr_decay", 0.5),
    ("lr_decay 1", "lr_decay", 1),
    ("lr_decay 0.001", "lr_decay", 0.001),
    ("max_steps 1", "max_steps", 1),
    ("max_steps 250000", "max_steps", 250000),
    ("min_improvement 0", "min_improvement", 0),
    ("min_improvement 0.25", "min_improvement", 0.25),
    ("restarts 1", "restarts", 1),
    ("restarts 5", "restarts", 5),
    ("validation 0", "validation", 0),
    ("validation 0.3", "validation", 0.3),
    ("jitter 0", "jitter", 0),
    ("seed 0", "seed", 0),
])
def test_scalar_settings(setting, key, value):
    assert train_of(f"    {setting}\n") == {key: value}


@pytest.mark.parametrize("setting, value", [
    ("optimizer sgd", {"name": "sgd"}),
    ("optimizer sgd(0.1)", {"name": "sgd", "lr": 0.1}),
    ("optimizer momentum(0.1, 0.5)", {"name": "momentum", "lr": 0.1, "beta": 0.5}),
    ("optimizer rmsprop(lr=0.01, beta=0.95, eps=1e-6)", {"name": "rmsprop", "lr": 0.01, "beta": 0.95, "eps": 1e-6}),
    ("optimizer adam", {"name": "adam"}),
])
def test_optimizer_forms(setting, value):
    assert train_of(f"    {setting}\n")["optimizer"] == value


def test_comments_and_spacing_are_free():
    got = train_of("    # a comment\n    lr_decay   0.9      # per epoch\n\n    max_steps 12\n")
    assert got == {"lr_decay": 0.9, "max_steps": 12}


def test_the_train_section_travels_in_the_manifest():
    from tests.reference import build

    text = trained("    normalize(mean=0.5, std=2)\n    lr_decay 0.7\n    early_stop 2\n    restarts 2\n")
    model = build(text)
    assert model.manifest["train"] == {"normalize": {"mean": 0.5, "std": 2.0}, "lr_decay": 0.7,
                                       "early_stop": {"patience": 2, "min_delta": 0.0}, "restarts": 2}


# ---- mistakes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, where, message", [
    # normalize
    ("    normalize(mean=0.1, std=0)\n", "6:29", "normalize std must be a positive number, got 0"),
    ("    normalize(mean=1, std=-2)\n", "6:27", "normalize std must be a positive number, got -2"),
    ("    normalize(0.1, 0)\n", "6:20", "normalize std must be a positive number, got 0"),
    ('    normalize(mean="a", std=1)\n', "6:20", "normalize mean must be a number, got 'a'"),
    ("    normalize(mean=0.1)\n", "6:5", "normalize needs both mean and std"),
    ("    normalize(mean=[0.1, 0.2], std=1)\n", "6:20", "normalize mean has 2 values, but the input has 1 channel(s)"),
    ("    normalize(mean=[0.1], std=[0])\n", "6:31",
     "normalize std must be positive numbers, one per channel, got a list"),
    ("    normalize()\n", "6:5", "normalize needs both mean and std"),
    ("    normalize 0.5\n", "6:5",
     "normalize takes a mean and a standard deviation, like normalize(mean=0.1307, std=0.3081)"),
    ("    normalize(mean=1, mean=2)\n", "6:23", "normalize takes mean and std, once each"),
    ("    normalize(avg=1, std=2)\n", "6:15", "normalize takes mean and std, once each"),
    ("    normalize(mean=1, std=2, 3)\n", "6:30", "normalize takes mean and std, once each"),
    # lr_decay
    ("    lr_decay 0\n", "6:14", "'lr_decay' must be a factor in (0, 1], got 0"),
    ("    lr_decay 1.5\n", "6:14", "'lr_decay' must be a factor in (0, 1], got 1.5"),
    ("    lr_decay -0.5\n", "6:14", "'lr_decay' must be a factor in (0, 1], got -0.5"),
    ("    lr_decay 0.5\n    lr_decay 0.6\n", "7:5", "training setting 'lr_decay' is given twice"),
    ("    lr_decay(0.5)\n", "6:5", "'lr_decay' takes a value, like 'lr_decay 10'"),
    # max_steps, min_improvement, restarts, validation
    ("    max_steps 0\n", "6:15", "'max_steps' must be a positive integer, got 0"),
    ("    max_steps 2.5\n", "6:15", "'max_steps' must be a positive integer, got 2.5"),
    ("    min_improvement -1\n", "6:21", "'min_improvement' must be a non-negative number, got -1"),
    ("    restarts 0\n", "6:14", "'restarts' must be a positive integer, got 0"),
    ("    validation 1\n", "6:16", "'validation' must be a fraction in [0, 1), got 1"),
    # early_stop
    ("    early_stop 0\n", "6:16", "early_stop needs a patience in epochs, got 0"),
    ("    early_stop true\n", "6:16", "early_stop needs a patience in epochs, got 'true'"),
    ("    early_stop(3, 0.5, 1)\n", "6:24", "early_stop takes at most 2 arguments (patience, min_delta)"),
    ("    early_stop(pateince=3)\n", "6:16",
     "early_stop has no argument 'pateince'; did you mean 'patience'?"),
    # optimizer hyperparameters: the rules fit and the optimizer classes apply too (cnnc_runtime.rules)
    ("    optimizer adam(beta1=1.5)\n", "6:20", "adam argument 'beta1' must be in [0, 1), got 1.5"),
    ("    optimizer adam(lr=0.1, beta2=1)\n", "6:28", "adam argument 'beta2' must be in [0, 1), got 1"),
    ("    optimizer adam(eps=0)\n", "6:20", "adam argument 'eps' must be a positive number, got 0"),
    ("    optimizer momentum(0.1, 1.0)\n", "6:29", "momentum argument 'beta' must be in [0, 1), got 1.0"),
    ("    optimizer rmsprop(lr=0)\n", "6:23", "rmsprop argument 'lr' must be a positive number, got 0"),
    ("    optimizer sgd(lr=-1)\n", "6:19", "sgd argument 'lr' must be a positive number, got -1"),
    # unknown settings, with a suggestion when one is close
    ("    lr_decy 0.5\n", "6:5", "unknown training setting 'lr_decy'; did you mean 'lr_decay'?"),
    ("    normalise(mean=0, std=1)\n", "6:5", "unknown training setting 'normalise'; did you mean 'normalize'?"),
    ("    max_step 10\n", "6:5", "unknown training setting 'max_step'; did you mean 'max_steps'?"),
    ("    restart 2\n", "6:5", "unknown training setting 'restart'; did you mean 'restarts'?"),
    ("    min_improvment 0.1\n", "6:5",
     "unknown training setting 'min_improvment'; did you mean 'min_improvement'?"),
    ("    earlystop 3\n", "6:5", "unknown training setting 'earlystop'; did you mean 'early_stop'?"),
    ("    batch 8\n    scheduel 3\n", "7:5", "unknown training setting 'scheduel'; did you mean 'schedule'?"),
])
def test_mistakes_are_located(settings, where, message):
    expect(settings, where, message)


def test_the_first_mistake_wins():
    expect("    epochs 3\n    lr_decay 2\n    max_steps 0\n", "7:14", "'lr_decay' must be a factor in (0, 1], got 2")


def test_early_stop_patience_error_points_at_the_argument():
    expect("    early_stop(patience=0)\n", "6:16", "early_stop argument 'patience' must be a positive integer, got 0")


def test_early_stop_patience_must_be_a_positive_integer():
    for bad in ("0", "2.5"):
        with pytest.raises(CnnError, match=f"early_stop argument 'patience' must be a positive integer, got {bad}"):
            check_source(trained(f"    early_stop(patience={bad})\n"), "t.cnn")
