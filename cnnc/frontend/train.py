"""The ``train { ... }`` section -> a plain dict the runtime understands (it travels in the artifact's manifest).

Every entry can be overridden from the command line (``cnnc train --lr ...``).
"""

from __future__ import annotations

from typing import Any

from cnnc.errors import CnnError, did_you_mean
from cnnc.frontend import ast
from cnnc.frontend.values import describe, evaluate
from cnnc_runtime import optimizers, rules, schedule, settings
from cnnc_runtime.losses import LOSSES, choices

OPTIMIZERS = {name: cls.hyperparameter_names() for name, cls in optimizers.OPTIMIZERS.items()}
SCALARS = settings.SECTION_SCALARS  # each the name of its setting in the runtime's Settings
KEYS = ("loss", "optimizer", "data", "early_stop", "normalize", "schedule", "augment", *SCALARS)
AUGMENTS = ("crop", "flip")  # augment's items, each the name of its setting
DEFAULT_CROP_PAD = 4


def _call_args(call: ast.Call, names: tuple[str, ...], table: dict[str, rules.Rule]) -> dict[str, Any]:
    """Arguments of an optimizer or early_stop call: positional in `names` order, then key=value, each checked
    by its rule in `table`."""
    out: dict[str, Any] = {}
    for i, a in enumerate(call.args):
        key = a.name if a.name is not None else (names[i] if i < len(names) else None)
        if key is None:
            raise CnnError(f"{call.name} takes at most {len(names)} arguments ({', '.join(names)})", a.loc)
        if key not in names:
            hint = did_you_mean(key, names) or f"; it takes {', '.join(names)}"
            raise CnnError(f"{call.name} has no argument '{key}'{hint}", a.loc)
        if key in out:
            raise CnnError(f"argument '{key}' is given twice", a.loc)
        value = evaluate(a.value, {})
        need = rules.problem(table, key, value)
        if need is not None:
            raise CnnError(f"{call.name} argument '{key}' must be {need}, got {describe(value)}", a.loc)
        out[key] = value
    return out


def _normalize(value: Any, s: ast.Setting, channels: int) -> dict[str, float | list[float]]:
    """normalize(mean=M, std=S): inputs become (x - M) / S after scaling to [0, 1] and padding.

    M and S are numbers, or lists with one number per input channel (``normalize(mean=[0.49, 0.48, 0.45], ...)``).
    """
    if not isinstance(value, ast.Call):
        raise CnnError("normalize takes a mean and a standard deviation, like normalize(mean=0.1307, std=0.3081)",
                       s.loc)
    out: dict[str, float | list[float]] = {}
    for i, a in enumerate(value.args):
        key = a.name or ("mean", "std")[min(i, 1)]
        v = evaluate(a.value, {})
        if key not in ("mean", "std") or key in out or i > 1:
            raise CnnError("normalize takes mean and std, once each", a.loc)
        items = v if isinstance(v, list) and v else [v]
        if not all(_is_number(x) and (key == "mean" or x > 0) for x in items):
            need = "a positive number" if key == "std" else "a number"
            if isinstance(v, list):
                need = ("positive numbers" if key == "std" else "numbers") + ", one per channel"
            raise CnnError(f"normalize {key} must be {need}, got {describe(v)}", a.value.loc)
        if isinstance(v, list) and len(v) not in (1, channels):
            raise CnnError(f"normalize {key} has {len(v)} values, but the input has {channels} channel(s)",
                           a.value.loc)
        out[key] = [float(x) for x in v] if isinstance(v, list) else float(v)
    if set(out) != {"mean", "std"}:
        raise CnnError("normalize needs both mean and std", s.loc)
    return out


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _schedule(value: Any, s: ast.Setting) -> dict[str, Any]:
    """schedule cosine | step(every=E, gamma=G) | constant: {"name": ..., its arguments}."""
    call = value if isinstance(value, ast.Call) else None
    name = call.name if call else (evaluate(value, {}) if isinstance(value, ast.Expr) else None)
    if name not in schedule.SCHEDULES:
        hint = did_you_mean(str(name), schedule.SCHEDULES) or f"; choose {', '.join(schedule.SCHEDULES)}"
        raise CnnError(f"unknown schedule {describe(name)}{hint}", (call or value or s).loc)
    takes = tuple(schedule.SCHEDULES[name])
    if call and not takes and call.args:
        raise CnnError(f"schedule {name} takes no arguments", call.loc)
    args = _call_args(call, takes, schedule.ARGUMENTS) if call else {}
    missing = [k for k, d in schedule.SCHEDULES[name].items() if d is None and k not in args]
    if missing:
        raise CnnError(f"schedule {name} needs {', '.join(missing)}, like {name}(every=30, gamma=0.1)",
                       (call or value).loc)
    return {"name": name, **dict(schedule.checked(name, args))}


def _augment(value: Any, s: ast.Setting, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """augment crop(pad=4), flip: the settings {"crop": pad, "flip": true} of those given; image inputs only."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for item in value if isinstance(value, list) else [value]:
        call = item if isinstance(item, ast.Call) else None
        name = call.name if call else (evaluate(item, {}) if isinstance(item, ast.Expr) else None)
        where = (item or s).loc
        if name not in AUGMENTS:
            hint = did_you_mean(str(name), AUGMENTS) or f"; choose {' or '.join(AUGMENTS)}"
            raise CnnError(f"unknown augmentation {describe(name)}{hint}", where)
        if name in seen:
            raise CnnError(f"augmentation '{name}' is given twice", where)
        seen.add(name)
        if len(input_shape) != 3:
            raise CnnError(f"{name} needs image inputs (CxHxW); this network takes vectors of "
                           f"{input_shape[0]}", where)
        if name == "flip":
            if call is not None and call.args:
                raise CnnError("flip takes no arguments", call.loc)
            out["flip"] = True
            continue
        args = _call_args(call, ("pad",), {"pad": (rules.is_count, "a positive integer")}) if call else {}
        out["crop"] = args.get("pad", DEFAULT_CROP_PAD)
    return out


def lower_train(section: ast.Train, input_shape: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """Check each setting of a train section (for a network of `input_shape`) and return them as a dict."""
    out: dict[str, Any] = {}
    where: dict[str, ast.Setting] = {}
    for s in section.settings:
        if s.key not in KEYS:
            raise CnnError(f"unknown training setting '{s.key}'{did_you_mean(s.key, KEYS)}", s.loc)
        if s.key in out or s.key in where:
            raise CnnError(f"training setting '{s.key}' is given twice", s.loc)
        where[s.key] = s
        value = s.value
        if isinstance(value, list) and s.key != "augment":
            raise CnnError(f"'{s.key}' takes one value, not a list", s.loc)
        if s.key == "augment":
            out.update(_augment(value, s, input_shape))
        elif s.key == "schedule":
            out["schedule"] = _schedule(value, s)
        elif s.key == "optimizer":
            call = value if isinstance(value, ast.Call) else None
            name = call.name if call else evaluate(value, {})
            if name not in OPTIMIZERS:
                hint = did_you_mean(str(name), OPTIMIZERS) or f"; choose {', '.join(OPTIMIZERS)}"
                raise CnnError(f"unknown optimizer {describe(name)}{hint}", (call or value).loc)
            args = _call_args(call, OPTIMIZERS[name], rules.HYPERPARAMETERS) if call else {}
            out["optimizer"] = {"name": name, **args}
        elif s.key == "early_stop":
            call = value if isinstance(value, ast.Call) else None
            args = _call_args(call, ("patience", "min_delta"), rules.SETTINGS) if call else {}
            if call is None:
                v = evaluate(value, {})
                if not rules.is_count(v):
                    raise CnnError(f"early_stop needs a patience in epochs, got {describe(v)}", value.loc)
                args = {"patience": v}
            out["early_stop"] = {"patience": args.get("patience", settings.DEFAULT_PATIENCE),
                                 "min_delta": float(args.get("min_delta", settings.Settings.min_delta))}
        elif s.key == "normalize":
            out["normalize"] = _normalize(value, s, input_shape[0] if len(input_shape) == 3 else 1)
        elif isinstance(value, ast.Call) or value is None:
            raise CnnError(f"'{s.key}' takes a value, like '{s.key} 10'", s.loc)
        elif s.key == "loss":
            v = evaluate(value, {})
            if v not in LOSSES:
                hint = did_you_mean(str(v), list(LOSSES)) or f"; choose {choices()}"
                raise CnnError(f"unknown loss {describe(v)}{hint}", value.loc)
            out["loss"] = v
        elif s.key == "data":
            if value.kind != "string":
                raise CnnError('data takes a quoted path, like data "data/mnist"', value.loc)
            out["data"] = value.value
        else:
            v = evaluate(value, {})
            need = rules.problem(rules.SETTINGS, s.key, v)
            if need is not None:
                raise CnnError(f"'{s.key}' must be {need}, got {describe(v)}", value.loc)
            out[s.key] = v
    if out.get("schedule", {"name": "constant"})["name"] != "constant" and out.get("lr_decay", 1) != 1:
        raise CnnError(f"lr_decay is the exponential schedule; it cannot go with schedule {out['schedule']['name']}: "
                       "choose one", where["lr_decay"].loc)
    if out.get("label_smoothing") and out.get("loss") == "mse":
        raise CnnError("label_smoothing applies to cross_entropy, not to mse", where["label_smoothing"].loc)
    return out
