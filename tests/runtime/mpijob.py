"""Running a Python script as an MPI job from the tests: ``mpiexec -n N python SCRIPT`` with a timeout."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cnnc_runtime.distributed import mpiexec_path

needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or mpiexec_path() is None,
                               reason="needs mpi4py and mpiexec: pip install 'cnnc[mpi]'")


def run_job(work: Path, source: str, *args: str, ranks: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """Write `source` (dedented) to WORK/job.py and run it as `ranks` ranks in `work`; the job's output and status.

    A job still running after `timeout` seconds fails the test (subprocess.TimeoutExpired): no test waits on a hang.
    """
    script = work / "job.py"
    script.write_text(textwrap.dedent(source))
    return run_command(work, [sys.executable, str(script), *args], ranks=ranks, timeout=timeout)


def run_command(work: Path, command: list[str], ranks: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """`mpiexec -n RANKS COMMAND` in `work`, one thread per rank (CNNC_THREADS=1: 2 ranks fill 2 cores)."""
    return subprocess.run([mpiexec_path(), "-n", str(ranks), *command], capture_output=True, text=True, cwd=work,
                          timeout=timeout, env={**os.environ, "CNNC_THREADS": "1"})
