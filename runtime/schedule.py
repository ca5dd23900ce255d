"""Learning-rate schedules: the learning rate of every training step, from the step's number alone.

A schedule is a pure function of the step (so a resumed run continues
exactly): an optional linear warmup of ``warmup`` epochs, then one of

- ``constant``: the base rate, times ``lr_decay ** epoch`` (exponential per
  epoch; ``lr_decay`` 1 keeps it constant);
- ``step(every, gamma=0.1)``: times ``gamma`` after every ``every`` epochs
  (PyTorch's ``StepLR`` counted in epochs);
- ``cosine``: from the base rate down to 0 over the steps after the warmup,
  updated every step (PyTorch's ``CosineAnnealingLR(T_max=those steps)``).

Epochs of the main schedule count from the end of the warmup, as PyTorch's
``SequentialLR`` hands over. During the warmup the rate of step ``t`` (from 0)
is ``lr * (t + 1) / W`` for ``W`` warmup steps: it reaches the base rate on the
warmup's last step.

``SCHEDULES`` is the table of the schedules (name -> arguments with defaults,
None for a required one). ``parse`` reads the one spelling that ``fit`` and the
CLI accept: ``cosine``, ``step(30)``, ``step(every=30, gamma=0.5)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from cnnc_runtime import rules

# name -> {argument: default (None: required)}, in positional order
SCHEDULES: dict[str, dict[str, float | int | None]] = {
    "constant": {},
    "step": {"every": None, "gamma": 0.1},
    "cosine": {},
}

# argument -> its rule (cnnc_runtime.rules)
ARGUMENTS: dict[str, rules.Rule] = {
    "every": (rules.is_count, "a positive integer (epochs)"),
    "gamma": (lambda v: rules.is_number(v) and 0 < v <= 1, "a factor in (0, 1]"),
}


@dataclass(frozen=True)
class Schedule:
    """A schedule as the settings give it: ``name`` and ``args`` (see ``SCHEDULES``), warmup epochs, lr_decay."""

    name: str = "constant"
    args: tuple[tuple[str, float], ...] = ()
    warmup: int = 0
    lr_decay: float = 1.0

    def factor(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        """The learning rate of step `step` (from 0) as a fraction of the base rate.

        `total_steps`: the steps of the whole run (the cosine reaches 0 there).
        """
        warm = self.warmup * steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        after = step - warm
        epoch = after // steps_per_epoch
        args = dict(self.args)
        value = self.lr_decay ** epoch
        if self.name == "step":
            value *= args.get("gamma", 0.1) ** (epoch // int(args["every"]))
        elif self.name == "cosine":
            span = max(total_steps - warm, 1)
            value *= 0.5 * (1 + math.cos(math.pi * min(after, span) / span))
        return value

    def describe(self) -> str:
        """The schedule as a user would write it: ``step(every=30, gamma=0.1)``, ``cosine``, ``constant``."""
        text = self.name + (f"({', '.join(f'{k}={v}' for k, v in self.args)})" if self.args else "")
        if self.lr_decay != 1:
            text += f", lr_decay {self.lr_decay}"
        return text + (f", warmup {self.warmup} epochs" if self.warmup else "")


def checked(name: str, args: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    """The arguments of schedule `name` with defaults filled in and each checked; ValueError naming the wrong one."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    takes = SCHEDULES[name]
    unknown = sorted(set(args) - set(takes))
    if unknown:
        raise ValueError(f"schedule {name} takes {', '.join(takes) or 'no arguments'}, not {', '.join(unknown)}")
    out = []
    for key, default in takes.items():
        value = args.get(key, default)
        if value is None:
            raise ValueError(f"schedule {name} needs {key}")
        rules.check(ARGUMENTS, key, value, f"schedule {name} {key}")
        out.append((key, value))
    return tuple(out)


_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")


def parse(text: str) -> tuple[str, dict[str, float | int]]:
    """(name, arguments) of ``cosine``, ``step(30)`` or ``step(every=30, gamma=0.5)``; ValueError otherwise."""
    m = _CALL.match(text)
    if not m:
        raise ValueError(f"cannot read schedule {text!r}; write e.g. cosine or step(every=30, gamma=0.1)")
    name, inner = m.group(1), m.group(2)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    names = list(SCHEDULES[name])
    args: dict[str, float | int] = {}
    parts = [p.strip() for p in inner.split(",")] if inner and inner.strip() else []
    for i, part in enumerate(parts):
        key, _, value = part.rpartition("=")
        key = key.strip() or (names[i] if i < len(names) else "")
        if not key or key in args:
            raise ValueError(f"cannot read schedule {text!r}: schedule {name} takes {', '.join(names) or 'nothing'}")
        try:
            args[key] = int(value) if re.fullmatch(r"\s*-?\d+\s*", value) else float(value)
        except ValueError:
            raise ValueError(f"cannot read schedule {text!r}: {value.strip()!r} is not a number") from None
    checked(name, args)
    return name, args


def make_schedule(spec: str | dict[str, Any] | None, warmup: int = 0, lr_decay: float = 1.0) -> Schedule:
    """A Schedule from a spelling (``parse``) or a dict ``{"name": ..., ARG: value}`` (the train section's form).

    ``lr_decay`` below 1 goes with the constant schedule only: with ``step`` or ``cosine`` it is a ValueError.
    """
    if spec is None:
        name, args = "constant", {}
    elif isinstance(spec, str):
        name, args = parse(spec)
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        args = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise ValueError(f"schedule must be a name like 'cosine' or 'step(every=30)', got {spec!r}")
    rules.check(rules.SETTINGS, "warmup", warmup, "warmup")
    rules.check(rules.SETTINGS, "lr_decay", lr_decay, "lr_decay")
    values = checked(name, args)
    if name != "constant" and lr_decay != 1:
        raise ValueError(f"lr_decay {lr_decay} is the exponential schedule; it cannot go with schedule {name}: "
                         "choose one")
    return Schedule(name, values, int(warmup), float(lr_decay))
