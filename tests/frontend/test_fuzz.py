"""Fuzzing the front end: whatever the text, checking it raises nothing but ``CnnError``.

Random text and bytes, and random edits of the example files (characters and
tokens deleted, inserted, replaced or duplicated). Any other exception is a
crash the user would see as a traceback.

Huge repeat counts and very deep nesting are kept out of the generated
inputs so that this file stays fast; each has its own test in
test_errors.py and below (they are errors, not hangs or RecursionErrors).
Hostile inputs have their own generators at the end: integer and float
literals of any size in every place a number goes, byte order marks,
blocks that multiply, and sizes no memory holds.
"""

from __future__ import annotations

import math
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cnnc.errors import CnnError, Diagnostics
from cnnc.pipeline import check_source, optimize, read_source

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SOURCES = [p.read_text() for p in sorted(EXAMPLES.glob("*.cnn"))]
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:x[0-9]+)+|-?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|->|\"[^\"]*\"|\S")
TOKENS = sorted({t for s in SOURCES for t in TOKEN.findall(s)} | {
    "network", "block", "table", "train", "input", "output", "as", "*", "->", "(", ")", "[", "]", "{", "}", ":",
    "=", ",", "+", "-", "/", "0", "1", "-1", "0x0", "2x2", "1e-3", ".5", "same", "valid", "true", "false",
    '"x"', "#", "\n", "add", "concat", "connect", "weights", "groups",
})

FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def known_bug(text: str) -> bool:
    """Inputs that hit the two known bugs (see the module docstring)."""
    huge_repeat = re.search(r"\*\s*\d{4,}", text) is not None
    deep = max(text.count("("), text.count("["), text.count("+") + text.count("-") + text.count("*")) > 150
    return huge_repeat or deep


def survives(text: str) -> None:
    """Check `text` (and fuse it, when it checks): only CnnError may come out."""
    try:
        g = check_source(text, "fuzz.cnn", Diagnostics())
    except CnnError as e:
        rendered = str(e)
        assert rendered.startswith(("fuzz.cnn:", "error: "))
        assert e.loc is None or (e.loc.line >= 1 and e.loc.column >= 1)
        return
    optimize(g)


# ---- random text and bytes ----------------------------------------------------

@FUZZ
@given(st.text(max_size=300))
def test_random_text(text):
    assume(not known_bug(text))
    survives(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from(sorted(set("".join(SOURCES)))), max_size=300))
def test_random_text_from_the_alphabet_of_the_examples(text):
    assume(not known_bug(text))
    survives(text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_random_token_soup(tokens):
    text = " ".join(tokens)
    assume(not known_bug(text))
    survives(text)


_TMP = Path(tempfile.mkdtemp(prefix="cnnc-fuzz-"))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_from_a_file(data):
    path = _TMP / "fuzz.cnn"
    path.write_bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(CnnError, match="not a UTF-8 text file"):
            check_source(read_source(path), str(path), Diagnostics())
        return
    assume(not known_bug(text))
    try:
        check_source(read_source(path), str(path), Diagnostics())
    except CnnError:
        pass


# ---- random edits of the examples ----------------------------------------------

@st.composite
def char_edits(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate"]))
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(1, 8)))
        if kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.characters(codec="utf-8")) + text[i:]
        elif kind == "replace":
            text = text[:i] + draw(st.sampled_from("0123456789x-.,()[]{}:=*#\" \nabz_")) + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


@st.composite
def token_edits(draw):
    tokens = [m.group() for m in re.finditer(r"\s+|" + TOKEN.pattern, draw(st.sampled_from(SOURCES)))]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "swap"]))
        i = draw(st.integers(0, len(tokens) - 1))
        if kind == "delete":
            del tokens[i]
        elif kind == "insert":
            tokens.insert(i, " " + draw(st.sampled_from(TOKENS)) + " ")
        elif kind == "replace":
            tokens[i] = draw(st.sampled_from(TOKENS))
        elif kind == "duplicate":
            j = min(len(tokens), i + draw(st.integers(1, 12)))
            tokens[i:i] = tokens[i:j]
        else:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
    return "".join(tokens)


@FUZZ
@given(char_edits())
def test_character_mutations_of_the_examples(text):
    assume(not known_bug(text))
    survives(text)


@FUZZ
@given(token_edits())
def test_token_mutations_of_the_examples(text):
    assume(not known_bug(text))
    survives(text)


def test_unmutated_examples_check():
    for text in SOURCES:
        survives(text)


# ---- the known bugs, kept out above -----------------------------------------------

def _run_child(code: str, timeout: float) -> str:
    """Run `code` in a fresh interpreter with 1 GiB of address space; its standard output."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=limit)
    return r.stdout


CHILD = """
import time
from cnnc.pipeline import check_source
from cnnc.errors import CnnError
check_source("network n {{ input x: 4 y = x -> relu }}", "warm.cnn")  # builds the parser
for n in {counts}:
    start = time.perf_counter()
    try:
        check_source(f"network n {{{{ input x: 4 y = x -> relu * {{n}} }}}}", "t.cnn")
        print("checked", end=" ")
    except CnnError:
        print("CnnError", end=" ")
    print(round(time.perf_counter() - start, 4), end=" ")
"""


def test_long_repetition_takes_linear_time():
    small, t_small, large, t_large = _run_child(CHILD.format(counts=(200, 2000)), timeout=60).split()
    assert small == large == "checked"
    assert float(t_large) < 20 * float(t_small) + 0.05  # 10 times the layers: 10 times the time, not 100


def test_absurd_repetition_is_an_error():
    # The 1 GiB limit is what proves no layer list is built; the timeout only guards against a hang (a fresh
    # interpreter's imports alone take over a second on a loaded 2-core machine).
    outcome, seconds = _run_child(CHILD.format(counts=(10**9,)), timeout=60).split()
    assert outcome == "CnnError"


def tower(depth: int, factor: int, layer: str = "dense(2)") -> str:
    """Blocks that each use the one below `factor` times: a few hundred bytes, factor**depth layers."""
    blocks = [f"block l0() {{ input x  y = x -> {layer} }}"]
    blocks += [f"block l{i}() {{ input x  y = x -> l{i - 1}() * {factor} }}" for i in range(1, depth + 1)]
    return "\n".join(blocks) + f"\nnetwork n {{ input x: 4  y = x -> l{depth}() }}\n"


MULTIPLIED = """
from cnnc.pipeline import check_source
from cnnc.errors import CnnError
try:
    check_source({source!r}, "t.cnn")
    print("checked")
except CnnError as e:
    print(str(e).splitlines()[0])
"""


@pytest.mark.parametrize("source, where", [
    (tower(5, 100), "t.cnn:7:34"),  # 10**10 layers in 347 bytes: has_params alone used to take minutes
    (tower(3, 100, "relu").replace("y = x -> l3() }", "y = x -> l3() * 9 }"), "t.cnn:5:34"),
    ("block b() { input x  y = x -> relu * 999 }\nnetwork n { input x: 4\n"
     + "".join(f"  y{i} = {'x' if i == 0 else f'y{i - 1}'} -> b() * 10\n" for i in range(11)) + "}\n", "t.cnn:13:15"),
], ids=["tower", "tower-repeated", "bindings-add-up"])
def test_blocks_that_multiply_are_refused_at_once(source, where):
    out = _run_child(MULTIPLIED.format(source=source), timeout=30)
    assert out.strip() == f"{where}: error: the network would unroll into more than 100,000 layers " \
                          "(blocks and repetition expanded)"


def test_a_block_multiplied_to_just_under_the_limit_checks():
    g = check_source(tower(2, 100, "relu"), "t.cnn")
    assert sum(1 for n in g if g.nodes[n]["op"] == "relu") == 10_000


# ---- hostile classes: huge literals, byte order marks, multiplying blocks, huge sizes ----------

HOLES = [  # a network with one place for a number
    "network n {{ input x: 1x8x8  y = x -> conv({}, 3x3) -> flatten -> dense(2) }}",
    "network n {{ input x: 1x8x8  y = x -> conv(2, {}x3) }}",
    "network n {{ input x: 1x{}x8  y = x -> relu }}",
    "network n {{ input x: 4  y = x -> dense({}) }}",
    "network n {{ input x: 4  y = x -> relu * {} }}",
    "table t {{ 0: {} }}\nnetwork n {{ input x: 2x8x8  y = x -> conv(1, 3x3, connect=t) }}",
    "network n {{ input x: 1x3x3  y = x -> conv(1, 1x1, weights=[[[[{}]]]]) }}",
    "network n {{ input x: 4  y = x -> leaky_relu({}) }}",
]


@FUZZ
@given(st.sampled_from(HOLES), st.one_of(
    st.builds(lambda first, n: first + "0" * n, st.sampled_from("123456789"), st.integers(0, 6000)),
    st.builds(lambda m, e: f"{m}e{e}", st.integers(1, 9), st.integers(-400, 400)),
))
def test_huge_literals_anywhere(hole, number):
    assume(not (hole.count("relu * ") and len(number) > 3))  # (repetition itself: test_absurd_repetition)
    survives(hole.format(number))


@FUZZ
@given(st.sampled_from(SOURCES), st.sampled_from(["\ufeff", ""]))
def test_a_byte_order_mark_changes_nothing(text, bom):
    assert check_source(bom + text, "f.cnn").graph["totals"] == check_source(text, "f.cnn").graph["totals"]


@FUZZ
@given(st.integers(1, 8), st.integers(1, 999),
       st.sampled_from([("relu", 1), ("dense(2)", 1), ("(relu -> tanh) * 3", 6)]), st.integers(1, 999))
def test_multiplying_blocks_answer_at_once(depth, factor, layer, uses):
    total = factor**depth * layer[1] * uses
    assume(total > 100_000 or total < 500)  # (networks near the limit are legal, and slow to fuzz)
    text = tower(depth, factor, layer[0]).replace(f"-> l{depth}() }}", f"-> l{depth}() * {uses} }}")
    survives(text)


@FUZZ
@given(st.lists(st.integers(1, 10**12), min_size=3, max_size=3), st.integers(1, 10**12),
       st.sampled_from(["conv({c}, {k}x{k}) -> flatten -> dense({c})", "dense({c})", "maxpool({k}) -> relu"]))
def test_huge_sizes_are_checked_without_allocating(shape, size, layers):
    dims = shape if "dense" != layers[:5] else shape[:1]
    text = f"network n {{ input x: {'x'.join(map(str, dims))}  y = x -> {layers.format(c=size, k=min(size, 7))} }}"
    survives(text)
    if math.prod(dims) > 2**31 - 1:  # the input alone is more than a tensor may hold
        with pytest.raises(CnnError, match="a tensor holds at most"):
            check_source(text, "t.cnn")
