"""The training recipe in the train section: optimizers of the table, schedules, warmup, augmentation,
label smoothing and gradient clipping; each lands in the train dict, and each mistake is located."""

from __future__ import annotations

import pytest

from cnnc.errors import CnnError
from cnnc.pipeline import check_source


def trained(settings: str, input_shape: str = "3x8x8") -> str:
    """An image network and a train section whose settings start on line 6, column 5."""
    return (f"network n {{\n    input x: {input_shape}\n    y = x -> flatten -> dense(2)\n}}\n"
            f"train {{\n{settings}}}\n")


def train_of(settings: str) -> dict:
    return check_source(trained(settings), "t.cnn").graph["train"]


def expect(settings: str, where: str, message: str, input_shape: str = "3x8x8") -> None:
    with pytest.raises(CnnError) as info:
        check_source(trained(settings, input_shape), "t.cnn")
    assert str(info.value).splitlines()[0] == f"t.cnn:{where}: error: {message}"


def test_the_resnet_recipe_lands_in_the_train_dict():
    got = train_of("    optimizer nesterov(lr=0.1, beta=0.9)\n    weight_decay 0.0001\n"
                   "    schedule step(every=30, gamma=0.1)\n    warmup 1\n    augment crop(pad=4), flip\n"
                   "    label_smoothing 0.1\n    clip_norm 5\n"
                   "    normalize(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])\n")
    assert got == {"optimizer": {"name": "nesterov", "lr": 0.1, "beta": 0.9}, "weight_decay": 0.0001,
                   "schedule": {"name": "step", "every": 30, "gamma": 0.1}, "warmup": 1,
                   "crop": 4, "flip": True, "label_smoothing": 0.1, "clip_norm": 5,
                   "normalize": {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}}


@pytest.mark.parametrize("setting, value", [
    ("augment flip", {"flip": True}),
    ("augment crop", {"crop": 4}),
    ("augment crop(2)", {"crop": 2}),
    ("augment flip, crop(pad=3)", {"crop": 3, "flip": True}),
])
def test_augment_forms(setting, value):
    """`augment` sets the settings crop (the padding) and flip, the names fit and the CLI use too."""
    assert train_of(f"    {setting}\n") == value


@pytest.mark.parametrize("setting, value", [
    ("schedule cosine", {"name": "cosine"}),
    ("schedule constant", {"name": "constant"}),
    ("schedule step(4)", {"name": "step", "every": 4, "gamma": 0.1}),
    ("schedule step(every=4, gamma=0.5)", {"name": "step", "every": 4, "gamma": 0.5}),
])
def test_schedule_forms(setting, value):
    assert train_of(f"    {setting}\n")["schedule"] == value


def test_adamw_takes_its_own_weight_decay():
    got = train_of("    optimizer adamw(lr=0.001, weight_decay=0.05)\n")
    assert got["optimizer"] == {"name": "adamw", "lr": 0.001, "weight_decay": 0.05}


@pytest.mark.parametrize("settings, where, message", [
    ("    augment flop\n", "6:13", "unknown augmentation 'flop'; did you mean 'flip'?"),
    ("    augment crop(pad=0)\n", "6:18", "crop argument 'pad' must be a positive integer, got 0"),
    ("    augment flip, flip\n", "6:19", "augmentation 'flip' is given twice"),
    ("    augment flip(1)\n", "6:13", "flip takes no arguments"),
    ("    schedule cosin\n", "6:14", "unknown schedule 'cosin'; did you mean 'cosine'?"),
    ("    schedule step\n", "6:14", "schedule step needs every, like step(every=30, gamma=0.1)"),
    ("    schedule step(every=2, gamma=3)\n", "6:28", "step argument 'gamma' must be a factor in (0, 1], got 3"),
    ("    schedule cosine(3)\n", "6:14", "schedule cosine takes no arguments"),
    ("    schedule cosine\n    lr_decay 0.9\n", "7:5",
     "lr_decay is the exponential schedule; it cannot go with schedule cosine: choose one"),
    ("    warmup -1\n", "6:12", "'warmup' must be a non-negative integer (epochs), got -1"),
    ("    label_smoothing 1\n", "6:21", "'label_smoothing' must be a fraction in [0, 1), got 1"),
    ("    loss mse\n    label_smoothing 0.1\n", "7:5", "label_smoothing applies to cross_entropy, not to mse"),
    ("    clip_norm 0\n", "6:15", "'clip_norm' must be a positive number (the largest global gradient norm), got 0"),
    ("    batch 3, 4\n", "6:5", "'batch' takes one value, not a list"),
    ("    optimizer nesterov(beta=1)\n", "6:24", "nesterov argument 'beta' must be in [0, 1), got 1"),
    ("    optimizer adamw(weight_decay=-1)\n", "6:21",
     "adamw argument 'weight_decay' must be a non-negative number, got -1"),
])
def test_mistakes_are_located(settings, where, message):
    expect(settings, where, message)


def test_crop_and_flip_need_image_inputs():
    expect("    augment crop\n", "6:13", "crop needs image inputs (CxHxW); this network takes vectors of 192",
           input_shape="192")
