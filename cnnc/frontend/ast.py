"""The parse tree as plain records, each with the location of its first token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnnc.errors import Loc


@dataclass
class Expr:
    """A value as written: ``kind`` is int, decimal, size, word, string, list or an operator (+ - * /)."""

    kind: str
    value: Any
    loc: Loc


@dataclass
class Argument:
    name: str | None  # None for positional arguments
    value: Expr
    loc: Loc


@dataclass
class Call:
    name: str
    args: list[Argument]
    loc: Loc


@dataclass
class Element:
    """One link of a chain: a layer or block use (``call``), or a group of elements, repeated ``repeat`` times."""

    call: Call | None
    group: list[Element] | None
    label: str | None
    label_loc: Loc | None
    repeat: int
    loc: Loc


@dataclass
class Binding:
    name: str
    source: str | Call
    chain: list[Element]
    loc: Loc


@dataclass
class InputDecl:
    name: str
    shape: tuple[int, ...] | None
    loc: Loc


@dataclass
class OutputDecl:
    name: str
    loc: Loc


@dataclass
class Network:
    name: str
    body: list[InputDecl | Binding | OutputDecl]
    loc: Loc


@dataclass
class Table:
    name: str
    rows: list[tuple[int, list[int], Loc]]
    loc: Loc


@dataclass
class Param:
    name: str
    default: Expr | None
    loc: Loc


@dataclass
class Block:
    name: str
    params: list[Param]
    body: list[InputDecl | Binding | OutputDecl]
    loc: Loc


@dataclass
class Setting:
    key: str
    value: Expr | Call | list[Expr | Call] | None  # a list: `augment crop(pad=4), flip`
    loc: Loc


@dataclass
class Train:
    settings: list[Setting]
    loc: Loc


@dataclass
class File:
    path: str
    source: str
    networks: list[Network] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    trains: list[Train] = field(default_factory=list)
