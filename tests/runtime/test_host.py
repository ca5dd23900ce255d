"""What LLVM says about this CPU is remembered, so loading a network does not load LLVM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnc_runtime import host

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu MHz\t\t: {mhz}\nflags\t\t: fpu sse2 {extra}\n\n" \
          "processor\t: 1\nvendor_id\t: AuthenticAMD\n"
LINUX = pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo here")


def test_the_fingerprint_ignores_the_clock_and_sees_the_features():
    base = host.fingerprint(CPUINFO.format(mhz="2596.1", extra="avx512f"))
    assert base == host.fingerprint(CPUINFO.format(mhz="3700.0", extra="avx512f"))
    assert base != host.fingerprint(CPUINFO.format(mhz="2596.1", extra=""))
    assert host.fingerprint("") is None and host.fingerprint(None) is None


def host_cpu_in_child(cache: Path) -> dict:
    code = ("import json, sys\nfrom cnnc_runtime.host import host_cpu\n"
            "print(json.dumps({'cpu': host_cpu(), 'llvm_loaded': 'llvmlite.binding' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CNNC_CACHE_DIR": str(cache)},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@LINUX
def test_llvm_is_asked_once_then_remembered(tmp_path):
    first = host_cpu_in_child(tmp_path)
    second = host_cpu_in_child(tmp_path)
    assert first["llvm_loaded"] and not second["llvm_loaded"]
    assert first["cpu"] == second["cpu"] == list(host.ask_llvm())


@LINUX
def test_a_damaged_record_is_asked_again_and_rewritten(tmp_path):
    host_cpu_in_child(tmp_path)
    (record,) = (tmp_path / "host").iterdir()
    record.write_text('{"triple": ')
    again = host_cpu_in_child(tmp_path)
    assert again["llvm_loaded"] and again["cpu"] == list(host.ask_llvm())
    assert json.loads(record.read_text())["features"] == host.ask_llvm()[2]


def test_missing_features_are_named():
    have = host.host_cpu()[2]
    assert host.missing_features(have) == []
    assert host.missing_features("+sse2,+no-such-feature,-avx512f") == ["no-such-feature"]


def test_the_cpu_has_a_model_name_to_print():
    name = host.cpu_model()
    assert isinstance(name, str) and name.strip() == name and name
