"""The training progress bar: content, throttling, silence off a TTY."""

from __future__ import annotations

import io
import re

from cnnc_runtime import progress
from cnnc_runtime.progress import ProgressBar, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_line_shows_the_figures(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    bar = ProgressBar(100, stream=out, enabled=True)
    clock.now += 30.0  # 25 batches in 30 s: 75 left take 90 s
    bar.update(25, 0.123456, 0.9712, 5321.4)
    text = out.getvalue()
    assert text.startswith("\r")
    for figure in (" 25/100", "0.1235", "97.1%", "5,321 img/s", "ETA 1:30", "[######------------------]"):
        assert figure in text, (figure, text)
    bar.close()
    assert out.getvalue().endswith("\r") and "\n" not in out.getvalue()


def test_redraws_are_throttled_and_the_last_batch_is_drawn(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    bar = ProgressBar(50, stream=out, enabled=True)
    for done in range(1, 51):
        clock.now += 0.01  # 100 batches per second
        bar.update(done, 1.0 / done, done / 50, 1000.0)
    frames = out.getvalue().split("\r")[1:]
    assert 4 <= len(frames) <= 7  # 0.5 s at 10 redraws/s, plus the final one
    assert frames[-1].startswith("50/50 [########################]") and "100.0%" in frames[-1]


def test_shorter_line_wipes_the_longer_one():
    out = io.StringIO()
    bar = ProgressBar(10, stream=out, enabled=True, min_interval=0)
    bar.update(1, 123456.0, 0.5, 1e6)
    first = len(out.getvalue()) - 1
    bar.update(2, 1.0, 0.5, 1.0)
    assert len(out.getvalue().split("\r")[2]) == first


def test_silent_when_not_a_tty():
    out = io.StringIO()
    bar = ProgressBar(10, stream=out)  # enabled=None: auto, and StringIO is no TTY
    assert not bar.enabled
    bar.update(5, 0.5, 0.5, 100.0)
    bar.close()
    assert out.getvalue() == ""


def test_unknown_accuracy_and_eta():
    bar = ProgressBar(10, stream=io.StringIO(), enabled=True)
    line = bar.line(0, float("nan"), None, 0.0)
    assert re.search(r"0/10 \[-{24}\] loss nan  acc\s+-\s+0 img/s  ETA --:--$", line), line


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(65.4) == "1:05"
    assert format_duration(3725) == "62:05"
    assert format_duration(float("nan")) == "--:--"
    assert format_duration(float("inf")) == "--:--"
