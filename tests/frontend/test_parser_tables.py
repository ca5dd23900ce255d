"""The parser's tables are kept in the cache directory; a damaged file is rebuilt, never trusted."""

from __future__ import annotations

import importlib

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
    files = list(fresh_parser.glob("lark-*.tables"))
    assert len(files) == 1
    parse.parser.cache_clear()
    assert parse.parse(SOURCE).networks[0].name == "n"


def test_a_damaged_tables_file_is_rebuilt(fresh_parser):
    parse.parse(SOURCE)
    (tables,) = fresh_parser.glob("lark-*.tables")
    tables.write_bytes(b"garbage\n" + bytes(100))
    parse.parser.cache_clear()
    assert parse.parse(SOURCE).networks[0].name == "n"
    with pytest.raises(CnnError, match="1:9"):
        parse.parse("network {")
