"""The training settings: one record, one name and one default for each setting, whichever way they come in.

The ``.cnn`` file's ``train`` section (``cnnc.frontend.train``), ``cnnc
train``'s flags and ``fit``'s keyword arguments all name a setting as the
train section does (``batch``, ``validation``, ``patience``, ...) and all
end up in one ``Settings``: the section's values over these defaults, then
the flags' or arguments' over those. Each value obeys its rule in
``cnnc_runtime.rules``, whichever way it came.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from cnnc_runtime import rules
from cnnc_runtime.optimizers import OPTIMIZERS, Optimizer, make_optimizer, optimizer_class
from cnnc_runtime.schedule import make_schedule

DEFAULT_PATIENCE = 5  # epochs, when early stopping is asked for without a patience (``early_stop(min_delta=...)``)


@dataclass
class Settings:
    """Everything a training run is asked to do (the train section, overridden by flags or ``fit``'s arguments)."""

    epochs: int = 10
    batch: int = 64
    loss: str | None = None  # None: the train section's, else cross_entropy
    optimizer: str | Optimizer = "adam"
    lr: float | None = None  # None: the optimizer's default
    optimizer_args: dict[str, float] = field(default_factory=dict)
    momentum: float | None = None
    validation: float = 0.0
    patience: int | None = None  # None: no early stopping
    min_delta: float = 0.0
    jitter: float = 0.0
    weight_decay: float = 0.0
    restarts: int = 1
    seed: int = 0
    max_steps: int | None = None
    min_improvement: float | None = None
    lr_decay: float = 1.0
    schedule: str | dict[str, Any] | None = None  # "cosine", "step(every=30, gamma=0.1)"; None: the constant one
    warmup: int = 0  # epochs
    crop: int = 0  # padding in pixels; 0: no crop
    flip: bool = False
    label_smoothing: float = 0.0
    clip_norm: float | None = None  # None: no clipping

    def check(self) -> None:
        """ValueError naming the first setting that breaks its rule (the train section's, ``cnnc_runtime.rules``)."""
        for name in RULED:
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                rules.check(rules.SETTINGS, name, value, name)
        if self.lr is not None:
            rules.check(rules.HYPERPARAMETERS, "lr", self.lr, "lr")
        make_schedule(self.schedule, self.warmup, self.lr_decay)  # (a ValueError for a schedule it cannot read)


NAMES = tuple(f.name for f in fields(Settings))
# settings whose rule is in rules.SETTINGS, and those of them that may be None (switched off)
RULED = tuple(name for name in NAMES if name in rules.SETTINGS)
OPTIONAL = ("patience", "max_steps", "min_improvement", "clip_norm")
# the train section's keys that hold one number, each the name of its setting
SECTION_SCALARS = ("batch", "epochs", "seed", "weight_decay", "jitter", "validation", "restarts", "max_steps",
                   "min_improvement", "lr_decay", "warmup", "label_smoothing", "clip_norm")
# the train section's keys that its own lines fill (``schedule step(...)``, ``augment crop(pad=4), flip``)
SECTION_RECIPE = ("schedule", "crop", "flip")
# fit's keywords from before the names were one; the README documented them, so they still work, with a warning
RENAMED = {"batch_size": "batch", "validation_split": "validation"}


def renamed(overrides: dict[str, Any], stacklevel: int = 3) -> dict[str, Any]:
    """`overrides` with each old keyword (``batch_size``) under its setting's name (``batch``), with a warning."""
    out = dict(overrides)
    for old, new in RENAMED.items():
        if old in out:
            if new in out:
                raise TypeError(f"{old} and {new} are the same setting; give only {new}")
            warnings.warn(f"the training setting {old} is now called {new} (as in the train section and the CLI); "
                          f"{old} will be removed", DeprecationWarning, stacklevel=stacklevel)
            out[new] = out.pop(old)
    return out


def settings_from(train: dict[str, Any], **overrides: Any) -> Settings:
    """Settings from a .cnn train section, with explicit (non-None) overrides winning.

    An optimizer kind that overrides the file's keeps only the file's lr and eps (if it takes eps): momentum's
    beta does not go to adam, nor to rmsprop, whose beta means something else. ``optimizer_args`` the kind
    does not take, or ``momentum`` with adam or rmsprop, are a ValueError; ``momentum`` with sgd switches to
    momentum with that beta, as it does when nothing names the optimizer.
    """
    s = Settings()
    opt = dict(train.get("optimizer", {}))
    if opt:
        s.optimizer = opt.pop("name")
        s.lr = opt.pop("lr", None)
        s.optimizer_args = opt
    s.loss = train.get("loss")
    for key in SECTION_SCALARS + SECTION_RECIPE:
        if key in train:
            setattr(s, key, train[key])
    if "early_stop" in train:
        s.patience = train["early_stop"]["patience"]
        s.min_delta = train["early_stop"]["min_delta"]
    file_kind, file_args = s.optimizer, s.optimizer_args
    explicit_args = overrides.pop("optimizer_args", None) or {}
    for k, v in overrides.items():
        if k not in NAMES:
            raise TypeError(f"unknown training setting {k!r}")
        if v is not None:
            setattr(s, k, v)
    named = bool(train.get("optimizer")) or overrides.get("optimizer") is not None
    _choose_optimizer(s, file_kind, file_args, dict(explicit_args), named)
    return s


# what a file's optimizer argument means in every optimizer that takes it (momentum's beta and rmsprop's do not agree)
_CARRIED = ("lr", "eps")


def _choose_optimizer(s: Settings, file_kind: str, file_args: dict[str, float], explicit: dict[str, float],
                      named: bool) -> None:
    """Settle s.optimizer and s.optimizer_args from the file's, the overrides and ``momentum``.

    `named`: the file or an override names the optimizer; when neither does, ``momentum`` chooses momentum
    instead of the default.
    """
    if isinstance(s.optimizer, Optimizer):
        if explicit or s.momentum is not None:
            raise ValueError("optimizer_args and momentum apply to an optimizer given by name, not to an "
                             f"Optimizer object ({s.optimizer!r}): set them on the object")
        s.optimizer_args = {}
        return
    optimizer_class(s.optimizer)  # a known name
    kind = s.optimizer.lower()
    if s.momentum is not None:
        if named and kind not in ("sgd", "momentum", "nesterov"):
            raise ValueError(f"momentum {s.momentum} is the beta of sgd with momentum, but the optimizer is {kind}; "
                             f"drop momentum or choose the momentum or nesterov optimizer")
        kind = kind if kind == "nesterov" else "momentum"
        explicit.setdefault("beta", s.momentum)
    takes = OPTIMIZERS[kind].hyperparameter_names()
    unknown = sorted(set(explicit) - set(takes))
    if unknown:
        raise ValueError(f"optimizer {kind} takes {', '.join(takes)}; optimizer_args has {', '.join(unknown)}")
    carried = file_args if kind == file_kind else {k: v for k, v in file_args.items() if k in _CARRIED and k in takes}
    s.optimizer, s.optimizer_args = kind, {**carried, **explicit}
    for key, value in s.optimizer_args.items():
        rules.check(rules.HYPERPARAMETERS, key, value, f"{kind} {key}")


def new_optimizer(s: Settings) -> Optimizer:
    """The optimizer `s` asks for, new (or the ``Optimizer`` object it was given)."""
    if isinstance(s.optimizer, Optimizer):
        return s.optimizer
    kwargs = dict(s.optimizer_args)
    if s.lr is not None:
        kwargs["lr"] = s.lr
    return make_optimizer(s.optimizer, **kwargs)  # (an lr not given: the optimizer's default, from its table)
