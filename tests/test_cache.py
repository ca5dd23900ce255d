"""cnnc.cache: compiling through the disk cache leaves the process as it was, and trusts no file it did not write."""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnc import generate
from cnnc.pipeline import check_source, compile_source
from cnnc_runtime import artifact, host
from cnnc_runtime.model import Model
from tests.runtime.test_fileio import tmpfs

NET = "network tiny { input x: 4\n y = x -> dense(3) -> relu }"


@pytest.mark.parametrize("enabled", [True, False])
def test_a_compile_pauses_the_garbage_collector_and_restores_it(enabled, monkeypatch):
    seen = []
    build = generate.build_module
    monkeypatch.setattr(generate, "build_module", lambda *a: seen.append(gc.isenabled()) or build(*a))
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


class Planted:
    """A pickle that, if ever loaded, creates `marker`: what an attacker would leave in a shared cache."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def fill_cache(cache: Path) -> list[Path]:
    """Every kind of cache entry: parser tables, host record, IR- and source-keyed compiled objects."""
    parse = importlib.import_module("cnnc.frontend.parse")
    parse.parser.cache_clear()
    host.host_cpu.cache_clear()
    compile_source(NET, "tiny.cnn")
    return sorted(p for p in cache.rglob("*") if p.is_file())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    importlib.import_module("cnnc.frontend.parse").parser.cache_clear()
    host.host_cpu.cache_clear()


def compiles_correctly() -> None:
    importlib.import_module("cnnc.frontend.parse").parser.cache_clear()
    host.host_cpu.cache_clear()
    manifest, obj = compile_source(NET, "tiny.cnn")
    assert manifest["network"] == "tiny"
    model = Model(manifest, obj)
    assert model(np.ones((2, 4), np.float32)).shape == (2, 3)


def test_the_cache_directory_is_private(cache):
    fill_cache(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700


def test_a_pickle_planted_under_any_cache_name_never_runs(cache, tmp_path):
    marker = tmp_path / "pwned"
    entries = fill_cache(cache)
    assert len(entries) >= 4
    payload = pickle.dumps(Planted(marker))
    for path in [*entries, *(cache / f"lark-{i}.tables" for i in range(2))]:
        path.write_bytes(b"0" * 64 + b"\n" + payload)  # (lark's own cache read a hash line, then unpickled)
    compiles_correctly()
    check_source(NET, "tiny.cnn")
    assert not marker.exists()


def forge(entries: list[Path]) -> list[Path]:
    """Valid-looking compiled entries (right key, right checksums) for a network called 'planted'."""
    forged = []
    for path in entries:
        if path.suffix == ".cnnc":
            manifest, obj, _ = artifact.read(path)
            forged.append(path.with_name(path.name + ".forged"))
            forged[-1].write_bytes(artifact.pack({**manifest, "network": "planted"}, obj))
    return forged


@pytest.mark.parametrize("attack", ["symlink", "other-writable", "another-users-dir"])
def test_entries_anyone_else_could_have_written_are_ignored(cache, attack):
    entries = [p for p in fill_cache(cache) if p.suffix == ".cnnc"]
    for path, fake in zip(entries, forge(entries)):
        if attack == "symlink":
            path.unlink()
            path.symlink_to(fake)
        else:
            fake.replace(path)
            path.chmod(0o646 if attack == "other-writable" else 0o600)
    if attack == "another-users-dir":
        if os.getuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        os.chown(cache, 65534, -1)
    compiles_correctly()


def test_the_default_cache_directory_is_made_private_if_others_may_write_it(cache, monkeypatch):
    monkeypatch.delenv("CNNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    fill_cache(cache / "cnnc")
    (cache / "cnnc").chmod(0o777)  # as made under umask 002 by an older cnnc
    compiles_correctly()
    assert stat.S_IMODE((cache / "cnnc").stat().st_mode) == 0o700


def test_a_shared_cache_dir_named_by_the_user_is_left_alone_and_not_used(cache):
    fill_cache(cache)
    cache.chmod(0o777)  # a team's directory: not ours to lock
    before = sorted(p.name for p in cache.iterdir())
    compiles_correctly()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o777
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing written into it either


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_entries_are_rebuilt(cache, damage):
    entries = fill_cache(cache)
    for path in entries:
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    compiles_correctly()
    rebuilt = fill_cache(cache)
    assert all(p.stat().st_size > 0 for p in rebuilt)
    assert artifact.read(next(p for p in rebuilt if p.name.startswith("src-")))[0]["network"] == "tiny"


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def another_networks_entry(path: Path, other: dict[str, Path]) -> None:
    """The entry of the same kind (source- or graph-keyed) compiled for another network: valid, but not ours."""
    path.write_bytes(other["src" if path.name.startswith("src-") else "ir"].read_bytes())


def a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("damage", [flip_a_bit, another_networks_entry, a_directory])
def test_entries_flipped_swapped_or_made_directories_give_the_right_network(cache, damage):
    entries = [p for p in fill_cache(cache) if p.suffix == ".cnnc"]
    compile_source(NET.replace("tiny", "other").replace("dense(3)", "dense(5)"), "other.cnn")
    others = [p for p in cache.glob("*.cnnc") if p not in entries]
    other = {"src" if p.name.startswith("src-") else "ir": p for p in others}
    for path in entries:
        damage(path) if damage is not another_networks_entry else damage(path, other)
    compiles_correctly()  # (the network named tiny, 3 outputs)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="mounts a tmpfs (Linux, root)")
@pytest.mark.parametrize("options", ["size=8k,mode=0700", "size=1m,mode=0700,ro"], ids=["full", "read-only"])
def test_a_cache_on_a_full_or_read_only_disk_is_no_error(cache, options):
    with tmpfs(cache, options):
        compiles_correctly()
        compiles_correctly()  # (again: whatever the first left there is read or ignored)
        assert all(p.stat().st_size > 0 for p in cache.rglob("*") if p.is_file())  # no torn entry left
