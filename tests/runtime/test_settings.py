"""One record of training settings: one name, one default and one rule for each, whichever way it comes in."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from cnnc.pipeline import check_source
from cnnc_runtime import rules, settings
from cnnc_runtime.settings import Settings, renamed, settings_from


def section(body: str) -> dict:
    return check_source(f"network n {{\n    input x: 4\n    y = x -> dense(2)\n}}\ntrain {{\n{body}}}\n",
                        "t.cnn").graph["train"]


def test_each_train_section_number_is_the_setting_of_its_name_with_its_rule():
    for key in settings.SECTION_SCALARS:
        assert key in settings.NAMES and key in rules.SETTINGS
    assert set(settings.RULED) == set(rules.SETTINGS)  # early_stop's patience and min_delta are settings too


@pytest.mark.parametrize("key, value", [("batch", 32), ("epochs", 3), ("validation", 0.25), ("jitter", 0.5),
                                        ("max_steps", 7), ("lr_decay", 0.5)])
def test_a_section_value_and_the_same_argument_give_the_same_settings(key, value):
    from_file = settings_from(section(f"    {key} {value}\n"))
    assert from_file == settings_from({}, **{key: value})
    assert getattr(from_file, key) == value


def test_the_defaults_are_the_records():
    assert settings_from({}) == Settings()
    assert (Settings().epochs, Settings().batch, Settings().patience) == (10, 64, None)


def test_early_stop_without_a_patience_takes_the_one_default():
    s = settings_from(section("    early_stop(min_delta=0.5)\n"))
    assert (s.patience, s.min_delta) == (settings.DEFAULT_PATIENCE, 0.5)
    s = settings_from(section("    early_stop 2\n"))
    assert (s.patience, s.min_delta) == (2, Settings().min_delta)


def test_old_names_are_renamed_with_a_warning():
    with pytest.warns(DeprecationWarning, match="batch_size is now called batch"):
        assert renamed({"batch_size": 8, "epochs": 2}) == {"batch": 8, "epochs": 2}
    with pytest.raises(TypeError, match="give only validation"):
        renamed({"validation_split": 0.1, "validation": 0.2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed({"batch": 8}) == {"batch": 8}


def test_an_unknown_setting_is_a_type_error():
    with pytest.raises(TypeError, match="unknown training setting 'batchsize'"):
        settings_from({}, batchsize=3)


def test_every_field_is_checked_by_a_rule_or_as_an_optimizer_setting():
    by_rule = set(settings.RULED)
    optimizer_side = {"loss", "optimizer", "lr", "optimizer_args", "momentum"}
    schedule_side = {"schedule"}  # Settings.check reads it as cnnc_runtime.schedule does
    assert {f.name for f in dataclasses.fields(Settings)} == by_rule | optimizer_side | schedule_side
    with pytest.raises(ValueError, match="unknown schedule"):
        Settings(schedule="cosin").check()
