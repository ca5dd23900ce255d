"""`cnnc train`, `cnnc eval` and `cnnc gradcheck` on a tiny network and a tiny synthetic .npz dataset.

Most runs go through ``cnnc.cli.main`` in this process (fast); the exit
statuses, the absence of tracebacks and Ctrl-C are checked on the command in
a subprocess. The compile cache lives in a fresh directory for this module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.clitools import cache_dir, cnnc_cmd, cnnc_process, one_line_error
from tests.reference import build

NET = """
network blobs {
    input x: 8
    h = x -> dense(16) -> relu
    y = h -> dense(3)
}
train {
    loss cross_entropy
    optimizer adam(lr=0.01)
    batch 32
    epochs 3
    seed 0
}
"""

GRADNET = """
network small {
    input image: 2x6x6
    c = image -> conv(3, 3x3, pad=same) -> relu -> maxpool(2x2)
    y = c -> flatten -> dense(4) -> tanh -> dropout(0.5) -> dense(3)
}
"""

EPOCH_LINE = re.compile(r"^epoch +(\d+)/(\d+)  loss \d+\.\d{4}  acc \d+\.\d\d%(  val_loss \d+\.\d{4}  val_acc "
                        r"\d+\.\d\d%)?  lr ([\d.e+-]+)  \d+\.\d s  [\d,]+ img/s$")
TEST_LINE = re.compile(r"^test: loss (\d+\.\d{4}), accuracy (\d+\.\d\d)% \(error (\d+\.\d\d)%\) on ([\d,]+) images$")


def blobs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((3, 8)) * 2.0
    y = rng.integers(0, 3, n)
    x = centres[y] + rng.standard_normal((n, 8)) * 0.6
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_train")
    (d / "net.cnn").write_text(NET)
    (d / "grad.cnn").write_text(GRADNET)
    x, y = blobs(300, 0)
    xt, yt = blobs(100, 1)
    np.savez(d / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    with cache_dir(d / "cache"):
        yield d


def epoch_lines(stdout: str) -> list[re.Match]:
    return [m for m in map(EPOCH_LINE.match, stdout.splitlines()) if m]


# ---- cnnc train ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(work):
    """One plain `cnnc train` run with the train section's settings, a log and the default output names."""
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--log", "m.jsonl")
    assert r.returncode == 0, r.stderr
    return r


def test_train_prints_a_line_per_epoch_and_the_test_accuracy(work, trained):
    lines = trained.stdout.splitlines()
    assert lines[0].startswith("training blobs on d.npz (300 images), ")
    epochs = epoch_lines(trained.stdout)
    assert [(int(m.group(1)), int(m.group(2))) for m in epochs] == [(1, 3), (2, 3), (3, 3)]
    assert all(m.group(3) is None for m in epochs)  # no validation in this run
    assert any(line.startswith("stopped: completed 3 epochs; 3 epochs in ") and
               line.endswith("wrote blobs.weights.npz") for line in lines)
    test = [m for m in map(TEST_LINE.match, lines) if m]
    assert len(test) == 1
    loss, acc, err, n = test[0].groups()
    assert n == "100"
    assert float(acc) + float(err) == pytest.approx(100.0, abs=0.011)
    assert float(acc) >= 90.0
    assert trained.stderr == ""


def test_train_writes_the_weights_and_the_checkpoint(work, trained):
    model = build(NET)
    model.load(work / "blobs.weights.npz")
    with np.load(work / "blobs.ckpt.npz") as z:
        meta = json.loads(bytes(z["meta"]).decode())
        assert meta["epoch"] == 3 and meta["network"] == "blobs" and meta["optimizer"] == "Adam"
        for k, v in model.params.items():
            np.testing.assert_array_equal(z[f"param/{k}"], v)
    # the printed test accuracy is the accuracy of the written weights
    with np.load(work / "d.npz") as d:
        loss, acc = model.evaluate(d["x_test"], d["y_test"])
    test = next(m for m in map(TEST_LINE.match, trained.stdout.splitlines()) if m)
    assert f"{100 * acc:.2f}" == test.group(2)
    assert f"{loss:.4f}" == test.group(1)


def test_train_equals_fit_with_the_same_settings(work, trained):
    """The command is model.fit with the train section's settings: bit-identical weights."""
    model = build(NET)
    with np.load(work / "d.npz") as d:
        model.fit(d["x"], d["y"], progress=False)
    with np.load(work / "blobs.weights.npz") as w:
        for k, v in model.params.items():
            np.testing.assert_array_equal(w[k], v, err_msg=k)


def test_log_has_one_json_line_per_epoch(work, trained):
    records = [json.loads(line) for line in (work / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "images_per_second",
                          "steps"}
    assert records[-1]["steps"] == 3 * 10  # 300 images in batches of 32


def test_plot_writes_a_png(work):
    pytest.importorskip("matplotlib")
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--epochs", "2", "--validation", "0.2",
                 "-o", "p.npz", "--checkpoint", "p.ckpt", "--plot", "c.png")
    assert r.returncode == 0, r.stderr
    assert "wrote c.png" in r.stdout
    data = (work / "c.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_resume_continues_the_run(work):
    whole = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--epochs", "4", "--jitter", "0.05",
                     "-o", "whole.npz", "--checkpoint", "whole.ckpt")
    assert whole.returncode == 0, whole.stderr
    part = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--epochs", "2", "--jitter", "0.05",
                    "-o", "part.npz", "--checkpoint", "part.ckpt")
    assert part.returncode == 0, part.stderr
    rest = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--epochs", "4", "--jitter", "0.05",
                    "-o", "rest.npz", "--checkpoint", "part.ckpt", "--resume", "part.ckpt")
    assert rest.returncode == 0, rest.stderr
    assert [int(m.group(1)) for m in epoch_lines(rest.stdout)] == [3, 4]
    assert "stopped: completed 4 epochs; 4 epochs in" in rest.stdout
    with np.load(work / "whole.npz") as a, np.load(work / "rest.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [m.group(0).split("  ")[1] for m in epoch_lines(whole.stdout)][2:] == \
        [m.group(0).split("  ")[1] for m in epoch_lines(rest.stdout)]  # the same losses


def test_every_override_is_accepted_and_used(work):
    args = ["--epochs", "2", "--batch", "16", "--optimizer", "momentum", "--lr", "0.05", "--momentum", "0.8",
            "--weight-decay", "0.001", "--jitter", "0.02", "--validation", "0.2", "--patience", "3",
            "--restarts", "2", "--seed", "3", "--max-steps", "1000"]
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", *args, "-o", "o.npz", "--checkpoint", "o.ckpt",
                 "--log", "o.jsonl")
    assert r.returncode == 0, r.stderr
    epochs = epoch_lines(r.stdout)
    assert [(int(m.group(1)), int(m.group(2))) for m in epochs] == [(1, 2), (2, 2)] * 2  # two restarts
    assert all(m.group(3) for m in epochs)  # validation columns
    assert re.search(r"^restart 1: seed 3, training loss \d+\.\d{4}, 2 epochs$", r.stdout, re.MULTILINE)
    assert re.search(r"^restart 2: seed 4, training loss \d+\.\d{4}, 2 epochs$", r.stdout, re.MULTILINE)
    records = [json.loads(line) for line in (work / "o.jsonl").read_text().splitlines()]
    assert records[1]["steps"] == 2 * 15  # 240 training images (20% held out) in batches of 16
    with np.load(work / "o.ckpt") as z:
        meta = json.loads(bytes(z["meta"]).decode())
        assert meta["optimizer"] == "Momentum" and meta["seed"] == 3 and meta["restart"] == 1
        assert float(z["opt/beta"]) == 0.8 and float(z["opt/lr"]) == 0.05
    # and they are exactly fit's settings: the same weights come out (fit trains the weights the model has:
    # the CLI's model was initialised from --seed)
    model = build(NET, seed=3)
    with np.load(work / "d.npz") as d:
        model.fit(d["x"], d["y"], epochs=2, batch=16, optimizer="momentum", lr=0.05,
                  optimizer_args={"beta": 0.8}, weight_decay=0.001, jitter=0.02, validation=0.2, patience=3,
                  restarts=2, seed=3, max_steps=1000, progress=False)
    with np.load(work / "o.npz") as w:
        for k, v in model.params.items():
            np.testing.assert_array_equal(w[k], v, err_msg=k)


RECIPE_NET = """
network tinycifar {
    input image: 3x32x32
    c = image -> conv(2, 3x3, stride=4) -> relu
    y = c -> flatten -> dense(10)
}
train {
    normalize(mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
}
"""


def test_the_recipe_flags_on_cifar_batches_equal_fit(work):
    """CIFAR-10 binary batches written here, every recipe flag, and the same weights as fit with those settings."""
    from cnnc_runtime.data import CIFAR_FILES, load_dataset

    (work / "cifar").mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR_FILES["train"] + CIFAR_FILES["test"]:
        labels = rng.integers(0, 10, (6, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
        (work / "cifar" / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
    (work / "cifar.cnn").write_text(RECIPE_NET)
    flags = ["--epochs", "3", "--batch", "8", "--optimizer", "nesterov", "--lr", "0.05", "--schedule", "cosine",
             "--warmup", "1", "--crop", "4", "--flip", "--label-smoothing", "0.1", "--clip-norm", "5"]
    r = cnnc_cmd(work, "train", "cifar.cnn", "--data", "cifar", *flags, "-o", "c.npz", "--checkpoint", "c.ckpt",
                 "--log", "c.jsonl")
    assert r.returncode == 0, r.stderr
    lrs = [float(m.group(4)) for m in epoch_lines(r.stdout)]
    # 4 steps an epoch (24 images): the warmup's last step, then steps 3 and 7 of the cosine over the 8 left
    cosine = [0.05 * (1 + np.cos(np.pi * t / 8)) / 2 for t in (3, 7)]
    assert lrs == pytest.approx([0.05, *cosine], rel=1e-2)
    assert [json.loads(line)["lr"] for line in (work / "c.jsonl").read_text().splitlines()] == pytest.approx(lrs,
                                                                                                           rel=1e-2)
    assert re.search(r"^test: .* on 6 images$", r.stdout, re.MULTILINE)
    model = build(RECIPE_NET)
    train = load_dataset(work / "cifar", raw=True)["train"]
    model.fit(train.x, train.y, epochs=3, batch=8, optimizer="nesterov", lr=0.05, schedule="cosine", warmup=1,
              crop=4, flip=True, label_smoothing=0.1, clip_norm=5, progress=False)
    with np.load(work / "c.npz") as w:
        for k, v in model.params.items():
            np.testing.assert_array_equal(w[k], v, err_msg=k)


GRAY_NET = """
network grayfolders {
    input image: 1x4x4
    y = image -> flatten -> dense(2)
}
"""


def test_a_folder_of_images_per_class_trains_and_without_pillow_the_error_names_the_extra(work, monkeypatch):
    image = pytest.importorskip("PIL.Image")
    for split, count in (("train", 6), ("test", 2)):
        for label, cls in enumerate(("dark", "light")):
            folder = work / "folders" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                image.fromarray(np.full((4, 4), 40 + 150 * label + i, np.uint8), "L").save(folder / f"{i}.png")
    (work / "gray.cnn").write_text(GRAY_NET)
    out = ["-o", "g.npz", "--checkpoint", "g.ckpt"]
    r = cnnc_cmd(work, "train", "gray.cnn", "--data", "folders", "--epochs", "2", "--flip", *out)
    assert r.returncode == 0, r.stderr
    assert "(12 images)" in r.stdout and re.search(r"^test: .* on 4 images$", r.stdout, re.MULTILINE)
    monkeypatch.setitem(sys.modules, "PIL", None)  # as without Pillow
    line = one_line_error(cnnc_cmd(work, "train", "gray.cnn", "--data", "folders", *out))
    assert line == "cnnc train: reading PNG or JPEG images needs Pillow: pip install 'cnnc[images]'"


def test_momentum_flag_turns_sgd_into_momentum(work):
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.1",
                 "--momentum", "0.5", "-o", "s.npz", "--checkpoint", "s.ckpt")
    assert r.returncode == 0, r.stderr
    with np.load(work / "s.ckpt") as z:
        assert json.loads(bytes(z["meta"]).decode())["optimizer"] == "Momentum"
        assert float(z["opt/beta"]) == 0.5


def test_max_steps_and_subset(work):
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--subset", "64", "--max-steps", "3",
                 "-o", "ms.npz", "--checkpoint", "ms.ckpt")
    assert r.returncode == 0, r.stderr
    assert "(64 images)" in r.stdout
    assert "stopped: reached the step limit of 3" in r.stdout


def test_train_without_data_is_one_line(work):
    line = one_line_error(cnnc_process(work, "train", "net.cnn"))
    assert line.startswith("cnnc train: no data; give --data")
    assert "net.cnn" in line


def test_train_with_missing_data_is_one_line(work):
    line = one_line_error(cnnc_cmd(work, "train", "net.cnn", "--data", "nowhere.npz"))
    assert line.startswith("cnnc train:") and "nowhere.npz" in line


def test_train_with_data_of_the_wrong_shape_is_one_line(work):
    np.savez(work / "wide.npz", x=np.zeros((10, 9), np.float32), y=np.zeros(10, np.int64))
    line = one_line_error(cnnc_cmd(work, "train", "net.cnn", "--data", "wide.npz", "-o", "x.npz",
                                   "--checkpoint", "x.ckpt"))
    assert line.startswith("cnnc train:")


def test_train_with_bad_flags(work):
    assert "--optimizer" in one_line_error(cnnc_cmd(work, "train", "net.cnn", "--optimizer", "lbfgs"))
    assert "--epochs" in one_line_error(cnnc_cmd(work, "train", "net.cnn", "--epochs", "many"))
    assert "unknown schedule 'cosin'" in one_line_error(cnnc_cmd(work, "train", "net.cnn", "--schedule", "cosin"))
    line = one_line_error(cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--crop", "2"))
    assert line == "cnnc train: crop and flip need image inputs (C, H, W); this network takes vectors (8,)"
    line = one_line_error(cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "--lr-decay", "0.5",
                                   "--schedule", "cosine"))
    assert "cannot go with schedule cosine" in line
    assert one_line_error(cnnc_cmd(work, "train", "nope.cnn", "--data", "d.npz")) == "cnnc: nope.cnn: no such file"


def test_train_with_labels_out_of_range_is_one_line(work):
    np.savez(work / "labels.npz", x=np.zeros((10, 8), np.float32), y=np.full(10, 7, np.int64))
    line = one_line_error(cnnc_cmd(work, "train", "net.cnn", "--data", "labels.npz", "-o", "l.npz",
                                   "--checkpoint", "l.ckpt"))
    assert "label 7 is out of range" in line


# ---- cnnc eval -------------------------------------------------------------------------------------


def test_eval_json(work, trained):
    r = cnnc_cmd(work, "eval", "net.cnn", "--weights", "blobs.weights.npz", "--data", "d.npz", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"loss", "accuracy", "n", "confusion"}
    assert d["n"] == 100 and d["split"] == "test"
    assert 0.0 <= d["accuracy"] <= 1.0 and d["accuracy"] >= 0.9
    conf = np.array(d["confusion"])
    assert conf.shape == (3, 3) and conf.sum() == d["n"]
    assert np.trace(conf) / d["n"] == pytest.approx(d["accuracy"])
    with np.load(work / "d.npz") as data:
        assert conf.sum(axis=1).tolist() == np.bincount(data["y_test"], minlength=3).tolist()
    test = next(m for m in map(TEST_LINE.match, trained.stdout.splitlines()) if m)
    assert f"{d['loss']:.4f}" == test.group(1)


def test_eval_table(work, trained):
    r = cnnc_cmd(work, "eval", "net.cnn", "--weights", "blobs.weights.npz", "--data", "d.npz")
    assert r.returncode == 0, r.stderr
    assert "blobs on the test split of d.npz: 100 images" in r.stdout
    assert re.search(r"^loss \d+\.\d{4}  accuracy \d+\.\d\d%  error \d+\.\d\d%$", r.stdout, re.MULTILINE)
    assert "confusion (rows: true class, columns: predicted)" in r.stdout


def test_eval_uses_the_train_split_without_a_test_split(work, trained):
    with np.load(work / "d.npz") as d:
        np.savez(work / "trainonly.npz", x=d["x"][:50], y=d["y"][:50])
    r = cnnc_cmd(work, "eval", "net.cnn", "--weights", "blobs.weights.npz", "--data", "trainonly.npz", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["split"] == "train" and d["n"] == 50


def test_eval_without_data_is_one_line(work, trained):
    line = one_line_error(cnnc_process(work, "eval", "net.cnn", "--weights", "blobs.weights.npz"))
    assert line.startswith("cnnc eval: no data; give --data")


def test_eval_needs_weights(work):
    line = one_line_error(cnnc_cmd(work, "eval", "net.cnn", "--data", "d.npz"))
    assert "--weights" in line


# ---- cnnc gradcheck ----------------------------------------------------------------------------------


def test_gradcheck(work):
    r = cnnc_cmd(work, "gradcheck", "grad.cnn")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("loss: native (float32) ")
    assert lines[1].split() == ["parameter", "checked", "max", "abs", "error", "max", "rel", "error"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert set(rows) == {"c.weight", "c.bias", "y.1.weight", "y.1.bias", "y.2.weight", "y.2.bias"}
    assert rows["c.bias"][0] == "3" and rows["c.weight"][0] == "12"
    for name, (_, _, rel_err) in rows.items():
        assert float(rel_err) < 1e-3, name
    m = re.match(r"^largest relative error: (\S+) \((\S+)\); ", lines[-1])
    assert m and float(m.group(1)) < 1e-3 and m.group(2) in rows
    assert float(m.group(1)) == max(float(v[2]) for v in rows.values())


def test_gradcheck_with_mse_and_options(work):
    r = cnnc_cmd(work, "gradcheck", "grad.cnn", "--loss", "mse", "--batch", "2", "--samples", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "largest relative error" in r.stdout
    assert [line.split()[1] for line in r.stdout.splitlines()[2:-1]] == ["3"] * 6


# ---- Ctrl-C --------------------------------------------------------------------------------------------


def long_training(work, weights: str, checkpoint: str) -> subprocess.Popen:
    """`cnnc train` on 60,000 images for 200 epochs, in the background: a run to interrupt."""
    x, y = blobs(60_000, 2)
    np.savez(work / "big.npz", x=x, y=y)
    return subprocess.Popen([sys.executable, "-m", "cnnc", "train", "net.cnn", "--data", "big.npz", "--epochs",
                             "200", "--batch", "16", "-o", weights, "--checkpoint", checkpoint], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(os.name != "posix", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_stops_cleanly_and_the_run_resumes(work):
    proc = long_training(work, "big.npz.w", "big.ckpt")
    out_lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for two epoch lines: the first epoch's checkpoint is written
            line = proc.stdout.readline()
            if not line:
                break
            out_lines.append(line)
            if line.startswith("epoch") and sum(x.startswith("epoch") for x in out_lines) == 2:
                break
        assert sum(x.startswith("epoch") for x in out_lines) == 2, "".join(out_lines)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    assert "big.ckpt" in err and "--resume big.ckpt" in err
    assert not (work / "big.npz.w").exists()  # no weights written by an interrupted run
    with np.load(work / "big.ckpt") as z:
        done = json.loads(bytes(z["meta"]).decode())["epoch"]
    assert done >= 1
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "big.npz", "--epochs", str(done + 1), "--batch", "16",
                 "-o", "big.npz.w", "--checkpoint", "big.ckpt", "--resume", "big.ckpt")
    assert r.returncode == 0, r.stderr
    assert [int(m.group(1)) for m in epoch_lines(r.stdout)] == [done + 1]
    assert (work / "big.npz.w").exists()


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM to a child process is POSIX")
def test_sigterm_stops_at_a_step_with_the_checkpoint_written_and_status_143(work):
    """A batch system's stop (SIGTERM) acts as Ctrl-C does: the run ends between two steps, resumable."""
    proc = long_training(work, "term.npz", "term.ckpt")
    try:
        first = proc.stdout.readline()
        while first and not first.startswith("epoch"):  # the first epoch's checkpoint is on disk
            first = proc.stdout.readline()
        assert first.startswith("epoch"), proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err)
    assert "Traceback" not in err and "--resume term.ckpt" in err
    assert not (work / "term.npz").exists()
    with np.load(work / "term.ckpt") as z:
        meta = json.loads(bytes(z["meta"]).decode())
    assert meta["epoch"] >= 1 and meta.get("partial") is not None  # stopped mid-epoch, at a step


def test_ctrl_c_during_the_first_checkpoint_does_not_point_to_a_missing_file(work, monkeypatch):
    from cnnc_runtime import train as train_mod

    def interrupted(*args, **kwargs):  # what a SIGINT during the first checkpoint's write does
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", interrupted)
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "d.npz", "-o", "ki.npz", "--checkpoint", "ki.ckpt")
    assert r.returncode == 130
    assert "epoch 1/3" not in r.stdout  # an epoch is reported only once its checkpoint is on disk
    assert "no checkpoint was written" in r.stderr and not (work / "ki.ckpt").exists()


def test_resume_from_a_missing_checkpoint_is_one_line(work):
    line = one_line_error(cnnc_process(work, "train", "net.cnn", "--data", "d.npz", "--resume", "missing.ckpt",
                                       "-o", "m.npz", "--checkpoint", "m.ckpt"))
    assert "missing.ckpt" in line


def test_resume_from_another_networks_checkpoint_is_one_line(work, trained):
    (work / "other.cnn").write_text(NET.replace("network blobs", "network other").replace("dense(16)", "dense(17)"))
    line = one_line_error(cnnc_cmd(work, "train", "other.cnn", "--data", "d.npz", "--resume", "blobs.ckpt.npz",
                                   "-o", "m.npz", "--checkpoint", "m.ckpt"))
    assert line.startswith("cnnc train: ") and "checkpoint of network blobs, not other" in line


def test_a_renamed_copy_of_a_cached_network_keeps_its_own_name(work, trained):
    (work / "renamed.cnn").write_text(NET.replace("network blobs", "network renamed"))
    r = cnnc_cmd(work, "train", "renamed.cnn", "--data", "d.npz", "--epochs", "1", "-o", "rn.npz",
                 "--checkpoint", "rn.ckpt")  # explicit names: the defaults would overwrite blobs.*.npz
    assert r.returncode == 0, r.stderr
    with np.load(work / "rn.ckpt") as z:
        assert json.loads(bytes(z["meta"]).decode())["network"] == "renamed"
    assert r.stdout.startswith("training renamed on d.npz")


IMAGES_NET = """
network digits {
    input image: 1x8x8
    c = image -> conv(2, 3x3) -> tanh -> avgpool(2x2)
    y = c -> flatten -> dense(3)
}
train {
    normalize(mean=0.2, std=0.7)
    optimizer adam(lr=0.01)
    batch 16
    epochs 2
    seed 0
}
"""


def test_cli_and_python_prepare_uint8_and_float_images_alike(work):
    """One input rule (cnnc_runtime.inputs) for `cnnc train`/`eval` and for fit/evaluate, uint8 or float: each
    batch is padded 6x6 -> 8x8 (uint8 scaled by 1/255) and normalized; the same weights bit for bit."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    x = rng.integers(0, 256, (80, 6, 6)).astype(np.uint8)
    xf = x.astype(np.float32) / np.float32(255)  # the same images, as float32 in [0, 1], 6x6 as stored
    (work / "digits.cnn").write_text(IMAGES_NET)
    for name, images in (("u8", x), ("f32", xf)):
        np.savez(work / f"{name}.npz", x=images, y=y, x_test=images[:30], y_test=y[:30])
        r = cnnc_cmd(work, "train", "digits.cnn", "--data", f"{name}.npz", "--validation", "0.25", "-o",
                     f"{name}.weights.npz", "--checkpoint", f"{name}.ckpt")
        assert r.returncode == 0, r.stderr
    for images in (x, xf):
        model = build(IMAGES_NET)
        model.fit(images, y, validation=0.25, progress=False)
        for name in ("u8", "f32"):
            with np.load(work / f"{name}.weights.npz") as w:
                for k, v in model.params.items():
                    np.testing.assert_array_equal(w[k], v, err_msg=f"{name}: {k}")
            r = cnnc_cmd(work, "eval", "digits.cnn", "--data", f"{name}.npz", "--weights", f"{name}.weights.npz",
                         "--json")
            assert r.returncode == 0, r.stderr
            loss, acc = model.evaluate(images[:30], y[:30])
            assert json.loads(r.stdout)["loss"] == loss and json.loads(r.stdout)["accuracy"] == acc
