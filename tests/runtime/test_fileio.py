"""Atomic writes: the target is always a complete old or new file."""

from __future__ import annotations

import contextlib
import errno
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


# ---- temporary files of killed writers -----------------------------------------------------------------

_BLOCKED_WRITER = """
import sys
from cnnc_runtime.fileio import atomic_write

def write(f):
    f.write(b"half of a checkpoint" * 5000)
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()  # blocked mid-write until told to go on (or killed)
    f.write(b"the rest")

atomic_write(sys.argv[1], write)
print("done", flush=True)
"""


def blocked_writer(target) -> subprocess.Popen:
    """A process stopped in the middle of writing `target` (its temporary file exists)."""
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_WRITER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    return proc


def temps(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_the_next_write_removes_a_killed_writers_temp_file(tmp_path):
    target = tmp_path / "model.ckpt"
    atomic_write_bytes(target, b"old")
    proc = blocked_writer(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdin.close()
    proc.stdout.close()
    assert len(temps(tmp_path)) == 1  # what kill -9 leaves
    atomic_write_bytes(target, b"new")
    assert os.listdir(tmp_path) == ["model.ckpt"]
    assert target.read_bytes() == b"new"


def test_a_live_writers_temp_file_is_left_alone(tmp_path):
    target = tmp_path / "model.ckpt"
    proc = blocked_writer(target)
    try:
        (live,) = temps(tmp_path)
        atomic_write_bytes(target, b"from this process")
        assert temps(tmp_path) == [live]
        proc.stdin.write(b"go on\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == b"done"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert target.read_bytes().endswith(b"the rest")
    assert os.listdir(tmp_path) == ["model.ckpt"]


def test_day_old_temp_files_go_and_others_stay(tmp_path):
    """A temporary file over a day old is no live writer's (another host's, an older cnnc's, or a reused pid)."""
    target = tmp_path / "w.npz"
    old = [tmp_path / ".w.npz.0123456789ab.tmp", tmp_path / ".w.npz.deadbeef-12.0123456789ab.tmp"]
    kept = [tmp_path / ".w.npz.deadbeef-13.0123456789ab.tmp",  # another host's, fresh
            tmp_path / ".w.npz.extra.0123456789ab.tmp",  # not a name this module makes
            tmp_path / ".w.npz.b.0123456789ab.tmp"]
    for path in old + kept:
        path.write_bytes(b"partial")
    for path in old:
        os.utime(path, (time.time() - 2 * fileio.STALE_SECONDS,) * 2)
    atomic_write_bytes(target, b"x")
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, *(p.name for p in kept)])


# ---- paths that cannot be written ----------------------------------------------------------------------


def _written_or_refused(target, message):
    """Each atomic writer fails with a WriteError naming `target` and saying why."""
    for write in (lambda: atomic_write_bytes(target, b"new"),
                  lambda: atomic_save_npz(target, {"w": np.ones(100000, np.float32)}),
                  lambda: atomic_write(target, lambda f: f.write(b"new"))):
        with pytest.raises(fileio.WriteError, match=message) as e:
            write()
        assert isinstance(e.value, OSError) and e.value.filename == str(target)
        assert str(target) in str(e.value)


def test_missing_directory(tmp_path):
    _written_or_refused(tmp_path / "no" / "such" / "out.npz", "does not exist")
    (tmp_path / "file").write_text("x")
    _written_or_refused(tmp_path / "file" / "out.npz", "not a directory")


def test_a_directory(tmp_path):
    (tmp_path / "out").mkdir()
    _written_or_refused(tmp_path / "out", "it is a directory")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_no_permission(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"old")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(fileio.os, "open", refuse)  # (as root, a read-only directory would not refuse)
    _written_or_refused(target, "permission denied")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("failing", ["fsync", "write"])
def test_full_disk_simulated(tmp_path, monkeypatch, failing):
    """ENOSPC from the last fsync or from a write in the block: the old file stays, no temporary file is left."""
    target = tmp_path / "ckpt.npz"
    atomic_write_bytes(target, b"old")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "fsync":
        monkeypatch.setattr(fileio.os, "fsync", full)
        _written_or_refused(target, "no space left on the device")
    else:
        with pytest.raises(fileio.WriteError, match="no space left"):
            atomic_write(target, lambda f: full())
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.npz"]


def test_other_errors_of_the_writer_pass_through(tmp_path):
    """An OSError of the block's own (a file it reads is missing) is not reported as a failed write of the target."""
    with pytest.raises(FileNotFoundError, match="input.bin"):
        atomic_write(tmp_path / "out", lambda f: open(tmp_path / "input.bin", "rb"))
    assert os.listdir(tmp_path) == []


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A small tmpfs mounted at `path` (root only: skipped where mounting is not allowed)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="mounts a tmpfs (Linux, root)")
def test_a_really_full_disk_and_a_read_only_one(tmp_path):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        target = small / "ckpt.npz"
        atomic_write_bytes(target, b"old")
        with pytest.raises(fileio.WriteError, match="no space left on the device"):
            atomic_save_npz(target, {"w": np.ones(1 << 20, np.float32)})
        assert target.read_bytes() == b"old" and os.listdir(small) == ["ckpt.npz"]
    with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
        _written_or_refused(ro / "out.npz", "read-only")
