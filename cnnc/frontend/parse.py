"""Text -> ``ast.File``: the Lark grammar, a Transformer with one method per rule, and syntax errors in words."""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError
from lark.grammar import Rule
from lark.lexer import TerminalDef

from cnnc.errors import CnnError, Loc
from cnnc.frontend import ast
from cnnc_runtime.cachedir import cache_dir, read_private, write_private

# Terminals as a reader would name them, for "expected ..." messages.
TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "a number",
    "SIGNED_INT": "a number",
    "DECIMAL": "a number",
    "SIZE": "a size like 5x5",
    "ROW_INDEX": "a table row like '0: 1 2'",
    "ESCAPED_STRING": "a string",
    "$END": "the end of the file",
}

# Small wrong inputs and what they mean: Lark matches the parser state of an
# error against these (``UnexpectedInput.match_examples``). Each has a test.
MISTAKES = {
    "a layer needs '->' before it; to bind a new name write 'NAME = ...'": [
        "network n { input x: 4 y = x -> relu tanh }",
        "network n { input x: 4 y = x -> relu tanh -> relu }",
    ],
    "an input needs a shape, like 'input image: 1x28x28' or 'input v: 784'": [
        "network n { input x: }",
        "network n { input x: y = x }",
    ],
    "a binding needs a value after '=', like 'y = x -> relu'": [
        "network n { input x: 4 y = }",
        "network n { input x: 4 y = -> relu }",
    ],
    "'->' must be followed by a layer": [
        "network n { input x: 4 y = x -> }",
        "network n { input x: 4 y = x -> -> relu }",
        "network n { input x: 4 y = x -> relu -> }",
    ],
    "unclosed '(' in the arguments": [
        "network n { input x: 4 y = x -> dense(4 }",
        "network n { input x: 4 y = x -> dense(4 -> relu }",
        "network n { input x: 4 y = x -> dense(4",
    ],
    "arguments are separated by ','": [
        "network n { input x: 4 y = x -> dense(4 bias=false) }",
        "network n { input x: 1x8x8 y = x -> conv(4 3x3) }",
        "network n { input x: 1x8x8 y = x -> conv(4, 3x3 bias=false) }",
        "network n { input x: 1x8x8 y = x -> conv(4, 3x3, pad=same stride=2) }",
        "network n { input x: 1x8x8 y = x -> conv(4, 3x3, pad=0.5 stride=2) }",
    ],
    "a table row is 'OUT: IN IN ...', like '0: 0 1 2'": [
        "table t { 0 1 2 }",
        "table t { a: 1 }",
    ],
}


def grammar_text() -> str:
    """grammar/cnn.lark: package data when installed, the checkout's file when run from the source tree."""
    try:
        return resources.files("cnnc.grammar").joinpath("cnn.lark").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        return (Path(__file__).resolve().parents[2] / "grammar" / "cnn.lark").read_text()


OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}


@lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser; building its tables takes ~50 ms, loading them from the cache directory a few.

    The tables are kept as JSON, never as lark's own pickle: a file in the
    cache directory is data to check, not code to run. Only an entry this user
    wrote (``cachedir.read_private``) whose key and content hash match is
    used; anything else is rebuilt and overwritten.
    """
    grammar = grammar_text()
    key = hashlib.sha256(json.dumps([grammar, OPTIONS, lark.__version__, TABLES_FORMAT]).encode()).hexdigest()
    path = cache_dir() / f"parser-{key[:32]}.json"
    loaded = _load_tables(path, key)
    if loaded is not None:
        return loaded
    built = Lark(grammar, **OPTIONS)
    data, memo = built.memo_serialize([TerminalDef, Rule])
    tables = json.dumps(_encode({"data": data, "memo": memo}), separators=(",", ":")).encode()
    header = json.dumps({"key": key, "sha256": hashlib.sha256(tables).hexdigest()}).encode()
    write_private(path, header + b"\n" + tables)
    return built


TABLES_FORMAT = 2  # the layout of the tables file (a header line, then the tables): a change makes old files misses


def _load_tables(path: Path, key: str) -> Lark | None:
    """The parser from a trusted, intact tables file for `key`, else None (the hash is checked before parsing)."""
    data = read_private(path)
    try:
        header, tables = data.split(b"\n", 1) if data is not None else (b"", b"")
        expected = json.loads(header) if header else None
        if expected is None or expected["key"] != key or hashlib.sha256(tables).hexdigest() != expected["sha256"]:
            return None
        decoded = json.loads(tables, object_hook=_decode_object)
        return Lark._load_from_dict(decoded["data"], decoded["memo"])
    except Exception:  # damaged, or from another lark: built again  # noqa: BLE001
        return None


def _encode(value: Any) -> Any:
    """Lark's serialised tables (dicts with int keys, tuples) as JSON that `_decode_object` gives back exactly."""
    if isinstance(value, dict):
        return {"d": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"t": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in the parser tables")


def _decode_object(value: dict) -> Any:
    """The inverse of `_encode` for one JSON object (``json.loads``'s object_hook)."""
    if "d" in value:
        return dict(value["d"])
    return tuple(value["t"])


MAX_INT = 2**63 - 1  # integer literals beyond this fit no count, size or table index


def _short(text: str) -> str:
    """A literal as a message quotes it: a 5,000-digit number is not echoed whole."""
    return text if len(text) <= 30 else f"{text[:12]}...{text[-12:]} ({len(text)} characters)"


class _ToAst(Transformer):
    """One method per grammar rule, each returning a plain record of ``cnnc.frontend.ast``."""

    def __init__(self, path: str, source: str) -> None:
        super().__init__()
        self.path = path
        self.source = source

    def loc(self, item, width: int | None = None) -> Loc:
        if isinstance(item, Token):
            return Loc(self.path, item.line, item.column, width or len(item), self.source)
        if item.line is None:
            return Loc(self.path, 1, 1, 1, self.source)
        w = width or (item.end_column - item.column if item.end_line == item.line else 1)
        return Loc(self.path, item.line, item.column, max(1, w), self.source)

    def integer(self, token: Token, text: str | None = None) -> int:
        """An integer literal; one too large for any count or size is a located error, not a traceback later."""
        text = str(token) if text is None else text
        digits = text.lstrip("+-").lstrip("0")
        if len(digits) > len(str(MAX_INT)) or int(text) > MAX_INT:
            raise CnnError(f"integer too large: {_short(text)} (at most {MAX_INT})", self.loc(token))
        return int(text)

    def start(self, items):
        f = ast.File(self.path, self.source)
        kinds = {ast.Network: f.networks, ast.Table: f.tables, ast.Block: f.blocks, ast.Train: f.trains}
        for it in items:
            kinds[type(it)].append(it)
        return f

    @v_args(meta=True)
    def network(self, meta, items):
        return ast.Network(str(items[0]), items[1:], self.loc(items[0]))

    def input_decl(self, items):
        return ast.InputDecl(str(items[0]), items[1], self.loc(items[0]))

    def shape(self, items):
        return tuple(self.integer(items[0], d) for d in str(items[0]).split("x"))

    def output_decl(self, items):
        return ast.OutputDecl(str(items[0]), self.loc(items[0]))

    def binding(self, items):
        name, source, *chain = items
        return ast.Binding(str(name), source, chain, self.loc(name))

    def source_name(self, items):
        return str(items[0]), self.loc(items[0])

    def source_call(self, items):
        return items[0]

    def chain_link(self, items):
        return items[0]

    def element_call(self, items):
        call, label, repeat = items
        return ast.Element(call, None, label and label[0], label and label[1], repeat or 1, call.loc)

    def element_word(self, items):
        word, label, repeat = items
        call = ast.Call(str(word), [], self.loc(word))
        return ast.Element(call, None, label and label[0], label and label[1], repeat or 1, call.loc)

    def element_group(self, items):
        *elements, repeat = items
        return ast.Element(None, elements, None, None, repeat, elements[0].loc)

    def label(self, items):
        return str(items[0]), self.loc(items[0])

    def repeat(self, items):
        n = self.integer(items[0])
        if n < 1:
            raise CnnError(f"a layer is repeated a positive number of times, not {n}", self.loc(items[0]))
        return n

    def call(self, items):
        name, *args = items
        return ast.Call(str(name), [a for a in args if a is not None], self.loc(name))

    def positional(self, items):
        return ast.Argument(None, items[0], items[0].loc)

    def keyword(self, items):
        return ast.Argument(str(items[0]), items[1], self.loc(items[0]))

    def _binop(op):  # noqa: N805
        def rule(self, items):
            return ast.Expr(op, (items[0], items[1]), items[0].loc)
        return rule

    add = _binop("+")
    sub = _binop("-")
    mul = _binop("*")
    div = _binop("/")

    def int(self, items):
        return ast.Expr("int", self.integer(items[0]), self.loc(items[0]))

    def decimal(self, items):
        value = float(items[0])
        if not math.isfinite(value):
            raise CnnError(f"number too large: {_short(str(items[0]))}", self.loc(items[0]))
        return ast.Expr("decimal", value, self.loc(items[0]))

    def size(self, items):
        return ast.Expr("size", tuple(self.integer(items[0], d) for d in str(items[0]).split("x")), self.loc(items[0]))

    def word(self, items):
        return ast.Expr("word", str(items[0]), self.loc(items[0]))

    def string(self, items):
        return ast.Expr("string", str(items[0])[1:-1].replace('\\"', '"').replace("\\\\", "\\"), self.loc(items[0]))

    @v_args(meta=True)
    def list(self, meta, items):
        return ast.Expr("list", [i for i in items if i is not None], self.loc(meta, 1))

    @v_args(meta=True)
    def table(self, meta, items):
        name, *rows = items
        return ast.Table(str(name), rows, self.loc(name))

    def row(self, items):
        index, *cols = items
        text = str(index).rstrip(" \t:")
        return self.integer(index, text), [self.integer(c) for c in cols], self.loc(index, len(text))

    def block(self, items):
        name, *rest = items
        params = [p for p in rest if isinstance(p, ast.Param)]
        body = [s for s in rest if not isinstance(s, ast.Param) and s is not None]
        return ast.Block(str(name), params, body, self.loc(name))

    def param(self, items):
        return ast.Param(str(items[0]), items[1], self.loc(items[0]))

    @v_args(meta=True)
    def train(self, meta, items):
        return ast.Train(items, self.loc(meta, 5))

    def setting_value(self, items):
        return ast.Setting(str(items[0]), items[1], self.loc(items[0]))

    def setting_call(self, items):
        return ast.Setting(str(items[0]), items[1], self.loc(items[0]))

    def setting_list(self, items):
        return ast.Setting(str(items[0]), list(items[1:]), self.loc(items[0]))

    def setting_flag(self, items):
        call = items[0]
        return ast.Setting(call.name, call, call.loc)


def _describe(terminals: set[str]) -> str:
    """'a name, '->' or '}'' from Lark's terminal names."""
    defs = {t.name: t for t in parser().terminals}
    words = set()
    for name in terminals:
        if name in TERMINAL_WORDS:
            words.add(TERMINAL_WORDS[name])
        elif name in defs and defs[name].pattern.type == "str":
            words.add(f"'{defs[name].pattern.value}'")
    words = sorted(words, key=lambda w: (w[0] == "'", w))
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _got(token: Token) -> str:
    if token.type == "$END":
        return "the end of the file"
    return f"'{token.value}'"


def _match(e: UnexpectedInput) -> str | None:
    """The MISTAKES label whose examples fail in the same parser state as `e`, if any."""
    try:
        return e.match_examples(parser().parse, MISTAKES, use_accepts=True, token_type_match_fallback=True)
    except Exception:  # a failing example must not hide the user's error
        return None


def _syntax_error(e: UnexpectedInput, path: str, source: str) -> CnnError:
    line, column = max(getattr(e, "line", 1) or 1, 1), max(getattr(e, "column", 1) or 1, 1)
    width = 1
    if isinstance(e, UnexpectedCharacters):
        char = source[e.pos_in_stream]
        message = f"unexpected character '{char}'; expected {_describe(e.allowed)}"
        if char == ">" and e.pos_in_stream > 0 and source[e.pos_in_stream - 1] == "-":
            column, width = column - 1, 2  # '->' where it cannot stand: point at the arrow
            message = f"unexpected '->'; expected {_describe(e.allowed - {'MINUS'})}"
        label = _match(e)
        if label:
            message = f"{label} (got '{'->' if width == 2 else char}')"
    else:
        token = e.token if isinstance(e, UnexpectedToken) else Token("$END", "")
        if token.type == "$END" or isinstance(e, UnexpectedEOF):
            lines = source.splitlines() or [""]
            line, column = len(lines), len(lines[-1]) + 1
        else:
            width = len(token)
        message = f"expected {_describe(set(e.expected))}, got {_got(token)}"
        label = _match(e)
        if label:
            message = f"{label} (got {_got(token)})"
    return CnnError(message, Loc(path, line, column, width, source))


def parse(source: str, path: str = "<string>") -> ast.File:
    """Parse a whole .cnn file; syntax errors become ``CnnError`` with a location and words, not token names."""
    source = source.removeprefix("\ufeff")  # a UTF-8 byte order mark, as some editors write
    try:
        tree = parser().parse(source)
    except UnexpectedInput as e:
        raise _syntax_error(e, path, source) from None
    try:
        return _ToAst(path, source).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, CnnError):
            raise e.orig_exc from None
        if isinstance(e.orig_exc, RecursionError):
            raise CnnError("the file nests groups or expressions too deeply", Loc(path, 1, 1, 1, source)) from None
        raise
    except RecursionError:
        raise CnnError("the file nests groups or expressions too deeply", Loc(path, 1, 1, 1, source)) from None
