"""Running the `cnnc` command from tests: in this process (fast) or as a real process (exit status, tracebacks)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from cnnc import cli


def cnnc_cmd(work: Path, *args: str):
    """`cnnc ARGS` in `work`, in this process: returncode, stdout, stderr (a bug: status 70 and its traceback)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = cli.main(list(args))
    finally:
        os.chdir(old)
    return SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())


def cnnc_process(work: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`cnnc ARGS` in `work` as a separate process."""
    return subprocess.run([sys.executable, "-m", "cnnc", *args], capture_output=True, text=True, cwd=work,
                          timeout=timeout)


def one_line_error(r, status: int = 2) -> str:
    """The single line a usage error prints, after checking the status and that no traceback leaked."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@contextlib.contextmanager
def cache_dir(path: Path) -> Iterator[Path]:
    """CNNC_CACHE_DIR set to `path` (created) for the duration, then restored."""
    path.mkdir(exist_ok=True)
    old = os.environ.get("CNNC_CACHE_DIR")
    os.environ["CNNC_CACHE_DIR"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            del os.environ["CNNC_CACHE_DIR"]
        else:
            os.environ["CNNC_CACHE_DIR"] = old
