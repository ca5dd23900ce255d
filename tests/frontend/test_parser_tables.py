"""The parser's tables are kept in the cache directory as JSON; a damaged or foreign file is rebuilt, never run."""

from __future__ import annotations

import importlib
import json

import pytest

from cnnc.errors import CnnError

parse = importlib.import_module("cnnc.frontend.parse")
SOURCE = "network n {\n    input x: 4\n    y = x -> dense(2)\n}\n"


@pytest.fixture
def fresh_parser(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    parse.parser.cache_clear()
    yield tmp_path
    parse.parser.cache_clear()


def test_tables_are_written_then_reused(fresh_parser):
    parse.parse(SOURCE)
    files = list(fresh_parser.glob("parser-*.json"))
    assert len(files) == 1
    parse.parser.cache_clear()
    assert parse.parse(SOURCE).networks[0].name == "n"


def test_a_damaged_tables_file_is_rebuilt(fresh_parser):
    parse.parse(SOURCE)
    (tables,) = fresh_parser.glob("parser-*.json")
    tables.write_bytes(b"garbage\n" + bytes(100))
    parse.parser.cache_clear()
    assert parse.parse(SOURCE).networks[0].name == "n"
    with pytest.raises(CnnError, match="1:9"):
        parse.parse("network {")


def test_tables_from_the_cache_parse_like_built_ones(fresh_parser):
    built = parse.parse(SOURCE)
    parse.parser.cache_clear()
    assert parse.parse(SOURCE) == built
    with pytest.raises(CnnError, match="'->' must be followed by a layer"):
        parse.parse("network n { input x: 4 y = x -> }")


def test_the_tables_file_holds_no_pickle(fresh_parser):
    parse.parse(SOURCE)
    (tables,) = fresh_parser.glob("parser-*.json")
    header, body = tables.read_bytes().split(b"\n", 1)
    assert json.loads(header)["sha256"] and json.loads(body)
