"""`cnnc profile`: the table and --json on the example networks, and its errors (one line, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnc.cli import profile as profile_command
from cnnc_runtime.peak import Peak
from tests.clitools import cnnc_cmd, cnnc_process, one_line_error

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PEAK = Peak("test", 16, {1: 100.0, 2: 200.0})


@pytest.fixture(autouse=True)
def known_peak(monkeypatch):
    """The peak as if measured before (its measurement and cache: tests/runtime/test_peak.py)."""
    monkeypatch.setattr(profile_command, "fma_peak", lambda threads, **how: PEAK)


def test_the_table_of_a_training_step(tmp_path):
    r = cnnc_cmd(tmp_path, "profile", str(EXAMPLES / "lenet5.cnn"), "--train", "--threads", "1", "--steps", "3")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("lenet5: training step of 64 images (fit), 1 thread, mean of 3:")
    assert "measured FMA peak 100 GFLOP/s on 1 thread" in out
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert header.split() == ["layer", "op", "pass", "ms", "share", "GFLOP/s", "%", "peak"]
    rows = {tuple(line.split()[:3]) for line in out.splitlines()}
    assert ("c1", "conv+tanh", "forward") in rows and ("c1", "conv+tanh", "backward") in rows
    assert ("logits", "cross_entropy", "loss") in rows
    assert any(line.startswith("optimizer") for line in out.splitlines())
    total = next(line for line in out.splitlines() if line.startswith("total (measured step)"))
    assert total.split()[-1] == "100.0%"
    assert "check: the layers' cycle counts add up to" in out


def test_json_of_an_inference_call(tmp_path):
    r = cnnc_cmd(tmp_path, "profile", str(EXAMPLES / "mlp.cnn"), "--json", "--batch", "8", "--steps", "5")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["network"], d["mode"], d["batch"], d["steps"]) == ("mlp", "infer", 8, 5)
    assert sum(line["seconds"] for line in d["lines"]) == pytest.approx(d["step_seconds"])
    assert [line["name"] for line in d["lines"]][-1] == "overhead (the rest)"
    assert r.stderr == ""


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("stem", sorted(p.stem for p in EXAMPLES.glob("*.cnn")))
def test_every_example_profiles(tmp_path, stem, train):
    args = ["profile", str(EXAMPLES / f"{stem}.cnn"), "--json", "--batch", "16", "--steps", "2"]
    r = cnnc_cmd(tmp_path, *args, *(["--train"] if train else []))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert sum(line["share"] for line in d["lines"]) == pytest.approx(1.0)
    rest = d["lines"][-1]
    assert rest["name"].startswith("overhead") and rest["share"] > -0.1  # (nothing measured twice)
    assert {line["phase"] for line in d["lines"]} >= ({"forward", "backward"} if train and stem != "filters"
                                                      else {"forward"})


def test_each_run_adds_a_sample_to_the_peak_and_measure_peak_a_long_one(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(profile_command, "fma_peak", lambda threads, **how: asked.append(how) or PEAK)
    for flags in ([], ["--measure-peak"]):
        r = cnnc_cmd(tmp_path, "profile", str(EXAMPLES / "mlp.cnn"), "--steps", "1", "--batch", "1", *flags)
        assert r.returncode == 0, r.stderr
    assert asked == [{"fresh": True, **profile_command.QUICK}, {"fresh": True, **profile_command.FULL}]


def test_a_mistake_in_the_file_is_located(tmp_path):
    bad = tmp_path / "bad.cnn"
    bad.write_text("network n {\n    input x: 4\n    y = x -> dense(3, bogus=1)\n}\n")
    r = cnnc_cmd(tmp_path, "profile", str(bad))
    assert r.returncode == 1
    assert f"{bad}:3:" in r.stderr and "error" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["profile"], "the following arguments are required: FILE"),
    (["profile", "FILE", "--batch", "0"], "expected an integer from 1 to 65536"),
    (["profile", "FILE", "--batch", "many"], "expected an integer from 1 to 65536"),
    (["profile", "FILE", "--threads", "0"], "expected a positive integer"),
    (["profile", "FILE", "--steps", "-1"], "expected an integer from 1 to 100000"),
    (["profile", "FILE", "--fast"], "unrecognized arguments: --fast"),
    (["profile", "missing.cnn"], "missing.cnn: no such file"),
    (["profile", "FILE", "--threads", "100000"], "threads must be a whole number of threads"),
])
def test_bad_flags_and_files_are_one_line_and_status_2(tmp_path, args, message):
    args = [str(EXAMPLES / "mlp.cnn") if a == "FILE" else a for a in args]
    assert message in one_line_error(cnnc_cmd(tmp_path, *args))


def test_an_artifact_is_refused_for_its_source(tmp_path):
    assert cnnc_cmd(tmp_path, "compile", str(EXAMPLES / "mlp.cnn"), "-o", "mlp.cnnc").returncode == 0
    assert "needs the .cnn source" in one_line_error(cnnc_cmd(tmp_path, "profile", "mlp.cnnc"))


def test_errors_as_a_real_process(tmp_path):
    r = cnnc_process(tmp_path, "profile", "--batch", "x", "nothing.cnn")
    assert "expected an integer" in one_line_error(r)
