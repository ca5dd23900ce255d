"""cnnc_runtime.peak: the FMA peak, measured by a real kernel and remembered per CPU; a bad record is measured anew."""

from __future__ import annotations

import json
import os

import pytest

from cnnc_runtime import peak


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def counted(monkeypatch):
    """`measure` replaced by a fixed answer that counts its calls (the real kernel is tested below)."""
    calls = []

    def measure(threads, seconds, repeats, kernel):
        calls.append(threads)
        return [10.0 * threads, 11.0 * threads]

    monkeypatch.setattr(peak, "measure", measure)
    return calls


def record_path(cache):
    return next((cache / "peak").glob("*.json"))


def test_the_kernel_measures_a_positive_rate():
    k = peak.FmaKernel()
    assert k.width in (4, 8, 16)
    assert k.run(1000) > 0
    samples = peak.measure(1, seconds=0.01, repeats=2, kernel=k)
    assert len(samples) == 2 and all(s > 1 for s in samples)


def test_the_peak_is_measured_once_then_read_from_the_cache(cache, counted):
    first = peak.fma_peak(2)
    assert counted == [1, 2]
    assert first.best == {1: 11.0, 2: 22.0}
    assert first.gflops(2) == 22.0 and first.gflops(1) == 11.0
    again = peak.fma_peak(2)
    assert counted == [1, 2] and again == first
    assert json.loads(record_path(cache).read_text())["best"] == {"1": 11.0, "2": 22.0}
    peak.fma_peak(3)  # a thread count not measured yet: measured and added
    assert counted == [1, 2, 3]
    assert set(peak.fma_peak(3).best) == {1, 2, 3}


def test_n_threads_are_at_least_n_times_one_when_a_neighbour_held_a_core():
    assert peak.Peak("cpu", 16, {1: 100.0, 2: 150.0}).gflops(2) == 200.0
    assert peak.Peak("cpu", 16, {1: 100.0, 2: 205.0}).gflops(2) == 205.0


@pytest.mark.parametrize("damage", [
    b"", b"\x80\x04not json", b"[1, 2]", b'{"record": 1}', b"[" * 100000,
    "digest", "huge", "negative", "width",
])
def test_a_damaged_or_forged_record_is_measured_again_and_rewritten(cache, counted, damage):
    peak.fma_peak(1)
    path = record_path(cache)
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        record = json.loads(path.read_text())
        if damage == "digest":
            record["best"]["1"] = 99.0  # changed without its digest
        else:
            body = {k: record[k] for k in ("record", "cpu", "width", "best")}
            body["best"] = {"1": 1e300} if damage == "huge" else {"1": -5.0} if damage == "negative" else body["best"]
            if damage == "width":
                body["width"] = 7
            record = body | {"sha256": peak._digest(body)}
        path.write_text(json.dumps(record))
    assert peak.fma_peak(1).best == {1: 11.0}
    assert counted == [1, 1]
    assert json.loads(path.read_text())["best"] == {"1": 11.0}  # rewritten whole


def test_a_record_others_could_write_is_not_trusted(cache, counted):
    peak.fma_peak(1)
    path = record_path(cache)
    os.chmod(path, 0o666)
    peak.fma_peak(1)
    assert counted == [1, 1]
    link = path.with_name("elsewhere.json")
    path.rename(link)
    path.symlink_to(link)
    peak.fma_peak(1)
    assert counted == [1, 1, 1]


def test_a_fresh_measurement_keeps_the_better_of_the_two(cache, counted, monkeypatch):
    peak.fma_peak(1)
    monkeypatch.setattr(peak, "measure", lambda threads, seconds, repeats, kernel: [5.0])  # a busy moment
    assert peak.fma_peak(1, fresh=True).best == {1: 11.0}
    monkeypatch.setattr(peak, "measure", lambda threads, seconds, repeats, kernel: [15.0])  # an idle one
    assert peak.fma_peak(1, fresh=True).best == {1: 15.0}
    assert peak.fma_peak(1).best == {1: 15.0}


def test_without_the_cache_it_measures_every_time(cache, counted):
    peak.fma_peak(1, use_cache=False)
    peak.fma_peak(1, use_cache=False)
    assert counted == [1, 1]
    assert not (cache / "peak").exists()
