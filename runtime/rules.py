"""What each training setting and optimizer hyperparameter may be: one set of rules for every way in.

The ``.cnn`` train section (``cnnc.frontend.train``, which turns a broken rule
into a located diagnostic), ``fit``'s arguments (``cnnc_runtime.train``) and
the optimizer classes all check values here, so a value one of them refuses
is refused by all. This module needs nothing but the standard library.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any


def is_count(v: Any) -> bool:
    """A positive integer (numpy integers too; not a bool, not 2.0)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


def is_natural(v: Any) -> bool:
    """A non-negative integer."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


def is_number(v: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_nonneg(v: Any) -> bool:
    return is_number(v) and v >= 0


def is_positive(v: Any) -> bool:
    return is_number(v) and v > 0


def is_fraction(v: Any) -> bool:
    """In [0, 1): a held-out fraction, a decay rate of a running average."""
    return is_number(v) and 0 <= v < 1


Rule = tuple[Callable[[Any], bool], str]  # (check, what the value must be)

# train-section key -> rule; the same keys name early_stop's arguments (patience, min_delta)
SETTINGS: dict[str, Rule] = {
    "batch": (is_count, "a positive integer"),
    "epochs": (is_count, "a positive integer"),
    "seed": (is_natural, "a non-negative integer"),
    "weight_decay": (is_nonneg, "a non-negative number"),
    "jitter": (is_nonneg, "a non-negative number (the noise's sigma)"),
    "validation": (is_fraction, "a fraction in [0, 1)"),
    "restarts": (is_count, "a positive integer"),
    "max_steps": (is_count, "a positive integer"),
    "min_improvement": (is_nonneg, "a non-negative number"),
    "lr_decay": (lambda v: is_number(v) and 0 < v <= 1, "a factor in (0, 1]"),
    "warmup": (is_natural, "a non-negative integer (epochs)"),
    "crop": (lambda v: is_natural(v) and v < 1 << 15, "a padding in pixels, a non-negative integer below 32768"),
    "flip": (lambda v: isinstance(v, bool), "true or false"),
    "label_smoothing": (is_fraction, "a fraction in [0, 1)"),
    "clip_norm": (is_positive, "a positive number (the largest global gradient norm)"),
    "patience": (is_count, "a positive integer"),
    "min_delta": (is_nonneg, "a non-negative number"),
}

# optimizer hyperparameter -> rule
HYPERPARAMETERS: dict[str, Rule] = {
    "lr": (is_positive, "a positive number"),
    "beta": (is_fraction, "in [0, 1)"),
    "beta1": (is_fraction, "in [0, 1)"),
    "beta2": (is_fraction, "in [0, 1)"),
    "eps": (is_positive, "a positive number"),
    "weight_decay": (is_nonneg, "a non-negative number"),  # AdamW's decoupled decay
}


def problem(rules: dict[str, Rule], key: str, value: Any) -> str | None:
    """What `value` must be when it breaks the rule for `key` ("a positive integer"); None when it is fine."""
    check, need = rules[key]
    return None if check(value) else need


def check(rules: dict[str, Rule], key: str, value: Any, label: str | None = None) -> None:
    """ValueError "LABEL must be NEED, got VALUE" when `value` breaks the rule for `key`."""
    need = problem(rules, key, value)
    if need is not None:
        raise ValueError(f"{label or key} must be {need}, got {value!r}")
