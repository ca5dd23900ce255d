"""cnnc.cache: compiling through the on-disk cache leaves the process as it found it."""

from __future__ import annotations

import gc

import pytest

from cnnc import compiler
from cnnc.cache import compile_source

NET = "network tiny { input x: 4\n y = x -> dense(3) -> relu }"


@pytest.mark.parametrize("enabled", [True, False])
def test_a_compile_pauses_the_garbage_collector_and_restores_it(enabled, monkeypatch):
    seen = []
    build = compiler.build_module
    monkeypatch.setattr(compiler, "build_module", lambda *a: seen.append(gc.isenabled()) or build(*a))
    (gc.enable if enabled else gc.disable)()
    try:
        compile_source(NET, "tiny.cnn", use_cache=False)
        assert seen == [False]  # while the IR was built
        assert gc.isenabled() == enabled
    finally:
        gc.enable()


def test_the_collector_comes_back_after_a_failed_compile():
    with pytest.raises(Exception, match="error"):
        compile_source("network broken {", "broken.cnn", use_cache=False)
    assert gc.isenabled()
