"""Evaluating argument expressions and checking them against an argument's kind.

Kinds (``Arg.kind`` in the op table): ``count`` a positive integer; ``size``
an int or HxW, both positive; ``pad`` a non-negative int or HxW, ``same`` or
``valid``; ``bool`` true/false; ``prob`` a number in [0, 1); ``float`` any
number; ``table`` a table's name; ``weights`` a nested list of numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnc.errors import CnnError, Loc
from cnnc.frontend import ast


def evaluate(expr: ast.Expr, env: dict[str, Any]) -> Any:
    """The value of an expression; words that name a block parameter take its value."""
    k = expr.kind
    if k in ("int", "decimal", "size", "string"):
        return expr.value
    if k == "word":
        return env.get(expr.value, expr.value)
    if k == "list":
        return [evaluate(e, env) for e in expr.value]
    left, right = (evaluate(e, env) for e in expr.value)
    for side, e in ((left, expr.value[0]), (right, expr.value[1])):
        if isinstance(side, bool) or not isinstance(side, (int, float)):
            raise CnnError(f"'{k}' works on numbers, not {describe(side)}", e.loc)
    if k == "+":
        return left + right
    if k == "-":
        return left - right
    if k == "*":
        return left * right
    if right == 0:
        raise CnnError("division by zero", expr.value[1].loc)
    if isinstance(left, int) and isinstance(right, int):
        if left % right:
            raise CnnError(f"{left} / {right} is not a whole number", expr.loc)
        return left // right
    return left / right


def describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"'{value}'"
    return str(value)


F32_MAX = float(np.finfo(np.float32).max)


def _finite32(v: int | float) -> bool:
    """Whether a number survives the conversion to float32 (finite and in range)."""
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= F32_MAX
    except OverflowError:  # an int beyond any float
        return False


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def convert(value: Any, kind: str, what: str, loc: Loc) -> Any:
    """Check `value` against `kind` and normalise it (sizes become (h, w) tuples)."""
    given = value
    bad = lambda need: CnnError(f"{what} must be {need}, got {describe(given)}", loc)
    if value is None or kind == "any":
        return value
    if kind == "count":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad("a positive integer")
        return value
    if kind == "size":
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if not isinstance(value, tuple) or len(value) != 2 or min(value) < 1:
            raise bad("a positive size like 3 or 3x3")
        return value
    if kind == "pad":
        if value in ("same", "valid"):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if not isinstance(value, tuple) or len(value) != 2 or min(value) < 0:
            raise bad("a non-negative int, HxW, same or valid")
        return value
    if kind == "bool":
        if value in ("true", "false"):
            return value == "true"
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if kind == "prob":
        if not _number(value) or not 0 <= value < 1:
            raise bad("a probability in [0, 1)")
        return float(value)
    if kind == "float":
        if not _number(value) or not _finite32(value):
            raise bad("a number")
        return float(value)
    if kind == "weights":
        return weights_array(value, what, loc)
    if kind == "table":
        if not isinstance(value, str):
            raise bad("the name of a table")
        return value
    raise AssertionError(f"unknown argument kind {kind}")


def weights_array(value: Any, what: str, loc: Loc) -> np.ndarray:
    """A nested list of numbers as a float32 array; ragged or non-numeric lists are errors."""
    def depth_shape(v: Any, depth: int = 0) -> tuple[int, ...]:
        if _number(v):
            return ()
        if depth >= 4:
            raise CnnError(f"{what}: a list of weights has at most 4 dimensions (out x in x kh x kw)", loc)
        if not isinstance(v, list) or not v:
            raise CnnError(f"{what} must be a nested list of numbers, like [[0, 1, 0], [1, -4, 1], [0, 1, 0]]", loc)
        shapes = {depth_shape(x, depth + 1) for x in v}
        if len(shapes) != 1:
            raise CnnError(f"{what}: the rows of the list have different lengths", loc)
        return (len(v), *shapes.pop())

    shape = depth_shape(value)
    if not shape:
        raise CnnError(f"{what} must be a list, got {describe(value)}", loc)
    flat = np.array(value, dtype=object).reshape(-1)
    bad = next((v for v in flat if not _finite32(v)), None)
    if bad is not None:
        raise CnnError(f"{what}: {describe(bad)} is not a float32 number (at most {F32_MAX:.7g} in magnitude)", loc)
    return np.array(value, dtype=np.float32).reshape(shape)
