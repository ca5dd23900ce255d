"""This CPU as LLVM names it: (triple, CPU name, feature string).

Asking LLVM means importing ``llvmlite.binding`` (25-35 ms here, more than all
the rest of loading a cached network), so the answer is remembered in the cache
directory under a fingerprint of what the operating system reports about the
CPU (``/proc/cpuinfo``'s first processor, without its clock lines) and of the
llvmlite version. A different CPU, a kernel that hides a feature (AVX-512 turned
off, say) or another LLVM asks again. Where there is no ``/proc/cpuinfo``,
LLVM is asked every time. (Under a CPU emulator that reports other features
than the kernel does, e.g. valgrind, set ``CNNC_TARGET=generic``.)
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import llvmlite  # the package only (its version); LLVM itself is loaded by llvm(), on first use

from cnnc_runtime.cachedir import cache_dir, read_private, write_private

VOLATILE = ("cpu MHz", "bogomips", "BogoMIPS")  # lines of /proc/cpuinfo that change while the CPU does not
RECORD = 2  # the version of what a record holds: a change makes every old record a miss


@lru_cache(maxsize=1)
def host_cpu() -> tuple[str, str, str]:
    """(triple, cpu name, feature string) of this machine, as ``llvmlite.binding`` reports them."""
    key = fingerprint(_cpuinfo())
    path = cache_dir() / "host" / f"{key}.json" if key else None
    known = _read_record(path) if path is not None else None
    if known is not None:
        return known
    answer = ask_llvm()
    if path is not None:
        triple, cpu, features = answer
        record = {"triple": triple, "cpu": cpu, "features": features, "sha256": _digest(answer)}
        write_private(path, json.dumps(record).encode())
    return answer


def _read_record(path: Path) -> tuple[str, str, str] | None:
    """A record this user wrote (``cachedir.read_private``) whose content hash matches, else None."""
    data = read_private(path)
    try:
        known = json.loads(data) if data is not None else None
        answer = (known["triple"], known["cpu"], known["features"])
    except (ValueError, KeyError, TypeError):
        return None  # not there yet, untrusted or damaged: ask LLVM and write it again
    if all(isinstance(s, str) for s in answer) and answer[0] and known.get("sha256") == _digest(answer):
        return answer
    return None


def _digest(answer: tuple[str, str, str]) -> str:
    return hashlib.sha256("\0".join(answer).encode()).hexdigest()


@lru_cache(maxsize=1)
def llvm() -> ModuleType:
    """``llvmlite.binding``, initialised for this machine: imported on first use, as only compiling needs it."""
    import llvmlite.binding as binding  # lazy: loading LLVM costs 20-30 ms, and only compiling needs it

    binding.initialize_native_target()
    binding.initialize_native_asmprinter()
    return binding


def ask_llvm() -> tuple[str, str, str]:
    """What LLVM says about this CPU (loads LLVM)."""
    ll = llvm()
    return ll.get_process_triple(), ll.get_host_cpu_name(), ll.get_host_cpu_features().flatten()


def _cpuinfo() -> str | None:
    """The first processor's entry of /proc/cpuinfo (on a large machine the whole file is long to generate)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = []
            for line in f:
                if not line.strip():
                    break
                lines.append(line)
            return "".join(lines)
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``'s model name), else what the platform module says."""
    for line in (_cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fingerprint(cpuinfo: str | None) -> str | None:
    """A hash of the first processor's entry in `cpuinfo`, the machine and the llvmlite version; None without one."""
    lines = [line for line in (cpuinfo or "").split("\n\n", 1)[0].splitlines() if not line.startswith(VOLATILE)]
    if not lines:
        return None
    blob = "\n".join([f"record {RECORD}", f"machine {platform.machine()}", f"llvmlite {llvmlite.__version__}", *lines])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def missing_features(features: str) -> list[str]:
    """The `+feature`s of a feature string that this CPU does not have."""
    _, _, host = host_cpu()
    have = {f[1:] for f in host.split(",") if f.startswith("+")}
    return sorted(f[1:] for f in features.split(",") if f.startswith("+") and f[1:] not in have)
