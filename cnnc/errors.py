"""User-facing errors: one exception type for every mistake in a .cnn file or a command.

Messages follow compilers people know::

    lenet5.cnn:7:16: error: unknown layer 'maxpol'; did you mean 'maxpool'?
        s2 = c1 -> maxpol(2x2)
                   ^~~~~~

Internal bugs stay ordinary Python exceptions, so they are never mistaken for
the user's fault.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Loc:
    """A place in a source file: 1-based line and column, and the width to underline."""

    file: str
    line: int
    column: int
    width: int = 1
    source: str | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


CONTEXT = 100  # characters of a long source line shown on each side of the culprit


def render(loc: Loc | None, kind: str, message: str) -> str:
    """`file:line:col: kind: message`, then the source line and a caret under the culprit."""
    if loc is None:
        return f"{kind}: {message}"
    text = f"{loc}: {kind}: {message}"
    if loc.source is not None:
        lines = loc.source.splitlines()
        if 1 <= loc.line <= len(lines):
            line = lines[loc.line - 1].expandtabs(1)
            width = max(1, min(loc.width, len(line) - loc.column + 1))
            line, column, width = _excerpt(line, loc.column, width)
            caret = " " * (column - 1) + "^" + "~" * (width - 1)
            text += f"\n{line}\n{caret}"
    return text


def _excerpt(line: str, column: int, width: int) -> tuple[str, int, int]:
    """A long line cut to CONTEXT characters around the culprit, with '...' where it was cut; the caret follows."""
    width = min(width, 2 * CONTEXT)
    start, end = max(0, column - 1 - CONTEXT), min(len(line), column - 1 + width + CONTEXT)
    head, tail = ("..." if start > 0 else ""), ("..." if end < len(line) else "")
    return head + line[start:end] + tail, column - start + len(head), width


class CnnError(Exception):
    """A mistake in the user's input, reported with its location and exit status 1."""

    def __init__(self, message: str, loc: Loc | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.notes: list[tuple[Loc, str]] = []  # where the culprit was reached from: block uses, innermost first

    def __str__(self) -> str:
        return "\n".join([render(self.loc, "error", self.message), *(render(loc, "note", m) for loc, m in self.notes)])

    def note_block_uses(self, uses: tuple[tuple[str, Loc], ...]) -> CnnError:
        """Add "in block 'B' used here" for each block use (outermost first) that led to the error; returns self."""
        for name, loc in reversed(uses):
            note = (loc, f"in block '{name}' used here")
            if note not in self.notes:
                self.notes.append(note)
        return self


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean 'X'?' when a close spelling exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Diagnostics:
    """Collects warnings (errors are raised at once) for the command line to print."""

    def __init__(self) -> None:
        self.warnings: list[tuple[Loc | None, str]] = []
        self.replayed: list[str] = []  # warnings already rendered, from the compile cache

    def warn(self, message: str, loc: Loc | None = None) -> None:
        self.warnings.append((loc, message))

    def render(self) -> list[str]:
        return self.replayed + [render(loc, "warning", msg) for loc, msg in self.warnings]
