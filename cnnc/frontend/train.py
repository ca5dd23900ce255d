"""The ``train { ... }`` section -> a plain dict the runtime understands (it travels in the artifact's manifest).

Every entry can be overridden from the command line (``cnnc train --lr ...``).
"""

from __future__ import annotations

from typing import Any

from cnnc.errors import CnnError, did_you_mean
from cnnc.frontend import ast
from cnnc.frontend.values import describe, evaluate
from cnnc_runtime import optimizers, rules, settings

OPTIMIZERS = {name: cls.hyperparameters for name, cls in optimizers.OPTIMIZERS.items()}
LOSSES = ("cross_entropy", "mse")
SCALARS = settings.SECTION_SCALARS  # each the name of its setting in the runtime's Settings
KEYS = ("loss", "optimizer", "data", "early_stop", "normalize", *SCALARS)


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


def _normalize(value: Any, s: ast.Setting) -> dict[str, float]:
    """normalize(mean=M, std=S): inputs become (x - M) / S after scaling to [0, 1] and padding."""
    if not isinstance(value, ast.Call):
        raise CnnError("normalize takes a mean and a standard deviation, like normalize(mean=0.1307, std=0.3081)",
                       s.loc)
    out: dict[str, float] = {}
    for i, a in enumerate(value.args):
        key = a.name or ("mean", "std")[min(i, 1)]
        v = evaluate(a.value, {})
        if key not in ("mean", "std") or key in out or i > 1:
            raise CnnError("normalize takes mean and std, once each", a.loc)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (key == "std" and v <= 0):
            need = "a positive number" if key == "std" else "a number"
            raise CnnError(f"normalize {key} must be {need}, got {describe(v)}", a.value.loc)
        out[key] = float(v)
    if set(out) != {"mean", "std"}:
        raise CnnError("normalize needs both mean and std", s.loc)
    return out


def lower_train(section: ast.Train) -> dict[str, Any]:
    """Check each setting of a train section and return them as a dict."""
    out: dict[str, Any] = {}
    for s in section.settings:
        if s.key not in KEYS:
            raise CnnError(f"unknown training setting '{s.key}'{did_you_mean(s.key, KEYS)}", s.loc)
        if s.key in out:
            raise CnnError(f"training setting '{s.key}' is given twice", s.loc)
        value = s.value
        if s.key == "optimizer":
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
            out["normalize"] = _normalize(value, s)
        elif isinstance(value, ast.Call) or value is None:
            raise CnnError(f"'{s.key}' takes a value, like '{s.key} 10'", s.loc)
        elif s.key == "loss":
            v = evaluate(value, {})
            if v not in LOSSES:
                hint = did_you_mean(str(v), LOSSES) or f"; choose {' or '.join(LOSSES)}"
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
    return out
