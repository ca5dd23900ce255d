"""Atomic writes: the target is always a complete old or new file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnc_runtime import fileio
from cnnc_runtime.fileio import atomic_open, atomic_save_npz, atomic_write, atomic_write_bytes


def test_write_bytes_creates_and_replaces(tmp_path):
    target = tmp_path / "blob.bin"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(str(target), b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_new_file_gets_umask_permissions_and_existing_mode_is_kept(tmp_path):
    target = tmp_path / "f"
    atomic_write_bytes(target, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    target.chmod(0o640)
    atomic_write_bytes(target, b"y")
    assert target.stat().st_mode & 0o777 == 0o640


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.npz"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_save_npz(target, {"w": np.ones(1000, np.float32)})
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_writer_raising_midway_keeps_old_file(tmp_path):
    target = tmp_path / "out"
    atomic_write_bytes(target, b"old")

    def half_then_fail(f):
        f.write(b"new but incomplete")
        raise RuntimeError("killed midway")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    with pytest.raises(KeyboardInterrupt), atomic_open(target) as f:
        f.write(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out"]


def test_save_npz_uses_the_exact_name(tmp_path):
    target = tmp_path / "model.ckpt"
    arrays = {"params": np.arange(10, dtype=np.float32), "step": np.array(7)}
    atomic_save_npz(target, arrays)
    assert os.listdir(tmp_path) == ["model.ckpt"]
    with np.load(target) as z:
        np.testing.assert_array_equal(z["params"], arrays["params"])
        assert int(z["step"]) == 7


_WRITER = """
import sys
from cnnc_runtime.fileio import atomic_write_bytes
path, size = sys.argv[1], int(sys.argv[2])
k = 1
while True:
    atomic_write_bytes(path, bytes([k % 256]) * size)
    if k == 2:
        print("ready", flush=True)
    k += 1
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_sigkill_while_writing_never_tears_the_file(tmp_path):
    size = 1 << 21
    target = tmp_path / "big.bin"
    atomic_write_bytes(target, b"\0" * size)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(size)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        seen = set()
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            data = target.read_bytes()
            assert len(data) == size and data.count(data[:1]) == size, "torn file"
            seen.add(data[0])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert len(seen) > 1, "the writer never replaced the file while we read"
    data = target.read_bytes()
    assert len(data) == size and data.count(data[:1]) == size
