"""Hostile command lines: each ends in a correct result, or in one line and exit status 2 with nothing written.

The table runs through ``cnnc.cli.main`` in this process (an escaping exception
fails the test); a few rows run again as real processes to check the exit
status and that no traceback reaches stderr. Everything works on a tiny dense
network and tiny .npz files; the compile cache lives in this module's directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zipfile
from pathlib import Path

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
    optimizer momentum(lr=0.02, beta=0.5)
    batch 32
    epochs 2
    seed 0
}
"""
ADAM_NET = NET.replace("network blobs", "network blobs_adam").replace("momentum(lr=0.02, beta=0.5)", "adam")
DATA_NET = NET.replace("network blobs", "network blobs_data").replace("seed 0", 'seed 0\n    data "d.npz"')
LINUX = os.path.isdir("/proc/self") and os.path.isdir("/sys/kernel")


def blobs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((3, 8)) * 2.0
    y = rng.integers(0, 3, n)
    return (centres[y] + rng.standard_normal((n, 8)) * 0.6).astype(np.float32), y.astype(np.int64)


def npy_claiming(path: Path, shape: tuple[int, ...]) -> bytes:
    """An .npy header claiming `shape` float32 values, followed by 64 bytes of them."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buf.write(bytes(64))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def flip_a_bit_in(path: Path, member: str, out: Path) -> None:
    """A copy of the .npz `path` with one bit of `member`'s data flipped (its CRC no longer matches)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26:info.header_offset + 30]), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)
    data[start + info.compress_size - 1] ^= 0x10
    out.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from cnnc_runtime import artifact
    from cnnc_runtime.data import encode_idx

    d = tmp_path_factory.mktemp("cli_hostile")
    for name, text in {"net.cnn": NET, "adam.cnn": ADAM_NET, "datanet.cnn": DATA_NET, "x.txt": NET,
                       "mynet.cnnc": NET}.items():
        (d / name).write_text(text)
    (d / "link.cnn").symlink_to(d / "net.cnn")
    (d / "bad-utf8.cnn").write_bytes(b"network n { input x: 8 \xff\xfe }")
    x, y = blobs(120, 0)
    xt, yt = blobs(40, 1)
    np.savez(d / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    np.savez(d / "blobs.weights.npz", x=x, y=y)  # a dataset that happens to have the default weights' name
    rng = np.random.default_rng(2)
    np.savez(d / "u8.npz", x=rng.integers(0, 256, (50, 8), dtype=np.uint8), y=rng.integers(0, 3, 50))
    np.save(d / "x.npy", x[:5])
    np.save(d / "w.npy", np.zeros(3))
    (d / "garbage.bin").write_bytes(b"not weights at all" * 10)
    build(NET).save(d / "w.npz")
    (d / "idx").mkdir()
    (d / "idx" / "train-images-idx3-ubyte").write_bytes(encode_idx(np.zeros((4, 2, 4), np.uint8)))
    (d / "idx" / "train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(4, np.uint8)))
    (d / "adir").mkdir()
    os.mkfifo(d / "fifo")
    npy_claiming(d / "huge.npy", (10**11, 8))
    with zipfile.ZipFile(d / "hugedata.npz", "w") as z:
        z.writestr("x.npy", npy_claiming(d / "scratch.npy", (10**11, 8)))
        z.writestr("y.npy", (d / "scratch.npy").read_bytes())
    with cache_dir(d / "cache"):
        for args in (["compile", "net.cnn", "--weights", "w.npz", "-o", "art.cnnc"],
                     ["compile", "net.cnn", "-o", "plain.cnnc"],
                     ["train", "net.cnn", "--data", "d.npz", "--epochs", "1", "-o", "t.npz", "--checkpoint", "t.ckpt"]):
            r = cnnc_cmd(d, *args)
            assert r.returncode == 0, r.stderr
        manifest, obj, weights = artifact.read(d / "art.cnnc")
        artifact.write(d / "notarget.cnnc", {k: v for k, v in manifest.items() if k != "target"}, obj, weights)
        artifact.write(d / "list.cnnc", [manifest], obj, weights)
        flip_a_bit_in(d / "t.ckpt", "best_params.npy", d / "flipped.ckpt")
        arrays = dict(np.load(d / "t.ckpt"))
        arrays["meta"] = np.frombuffer(b"[1, 2]", np.uint8)
        np.savez(d / "listmeta.ckpt", **arrays)
        os.replace(d / "listmeta.ckpt.npz", d / "listmeta.ckpt")
        yield d


def snapshot(work: Path) -> dict[str, str]:
    """A digest of every regular file in `work` (not the cache): what a refused command must leave as it was."""
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(work.rglob("*")) if p.is_file() and not p.is_symlink() and "cache" not in p.parts}


TRAIN = ("train", "net.cnn", "--data", "d.npz")
OUTS = ("-o", "f.npz", "--checkpoint", "f.ckpt")
RUN = ("run", "net.cnn", "--input", "x.npy")


def case(id: str, args: tuple[str, ...], expected: str, *, linux: bool = False):
    marks = [pytest.mark.skipif(not LINUX, reason="needs Linux's /proc and /sys")] if linux else []
    return pytest.param(args, expected, id=id, marks=marks)


REFUSED = [
    # an output over an input (item 7): the source, --weights, --data, --resume, --input, through a symlink too
    case("compile-default-output-is-the-source", ("compile", "mynet.cnnc"),
         "the default output (FILE.cnnc) mynet.cnnc would overwrite the input FILE mynet.cnnc"),
    case("compile-o-source", ("compile", "net.cnn", "-o", "net.cnn"), "would overwrite the input FILE net.cnn"),
    case("compile-o-weights", ("compile", "net.cnn", "--weights", "w.npz", "-o", "w.npz"), "the input --weights w.npz"),
    case("train-o-source", ("train", "x.txt", "--data", "d.npz", "-o", "x.txt"), "the input FILE x.txt"),
    case("train-o-data", (*TRAIN, "-o", "d.npz"), "the input --data d.npz"),
    case("train-o-symlink-to-source", (*TRAIN, "-o", "link.cnn"), "the input FILE net.cnn"),
    case("train-checkpoint-source", (*TRAIN, "--checkpoint", "net.cnn"), "the input FILE net.cnn"),
    case("train-log-data", (*TRAIN, *OUTS[:2], "--log", "d.npz"), "the input --data d.npz"),
    case("train-o-resume", (*TRAIN, "-o", "t.ckpt", "--resume", "t.ckpt"), "the input --resume t.ckpt"),
    case("train-o-idx-file", ("train", "net.cnn", "--data", "idx", "-o", "idx/train-images-idx3-ubyte"),
         "the input --data file train-images-idx3-ubyte"),
    case("train-o-train-section-data", ("train", "datanet.cnn", "-o", "d.npz", "--checkpoint", "f.ckpt"),
         "would overwrite the input the train section's data"),
    case("train-default-o-is-the-data", ("train", "net.cnn", "--data", "blobs.weights.npz", "--checkpoint", "f.ckpt"),
         "the default -o blobs.weights.npz would overwrite the input --data"),
    case("train-two-outputs-one-file", (*TRAIN, "-o", "same.npz", "--checkpoint", "same.npz"),
         "-o and --checkpoint are the same file"),
    case("run-o-input", (*RUN, "-o", "x.npy"), "the input --input x.npy"),
    case("run-o-artifact", ("run", "art.cnnc", "--input", "x.npy", "-o", "art.cnnc"), "the input FILE art.cnnc"),
    case("graph-o-source", ("graph", "net.cnn", "-o", "net.cnn"), "the input FILE net.cnn"),
    # outputs that cannot be written (item 13)
    case("graph-o-no-dir", ("graph", "net.cnn", "-o", "nodir/g.dot"), "cannot write nodir/g.dot (-o): no such dir"),
    case("compile-o-no-dir", ("compile", "net.cnn", "-o", "nodir/a.cnnc"), "cannot write nodir/a.cnnc (-o)"),
    case("run-o-no-dir", (*RUN, "-o", "nodir/y.npy"), "cannot write nodir/y.npy (-o): no such directory"),
    case("train-o-no-dir", (*TRAIN, "-o", "nodir/w.npz"), "cannot write nodir/w.npz (-o)"),
    case("train-checkpoint-no-dir", (*TRAIN, "--checkpoint", "nodir/c"), "cannot write nodir/c (--checkpoint)"),
    case("train-log-no-dir", (*TRAIN, *OUTS, "--log", "nodir/l"), "cannot write nodir/l (--log)"),
    case("compile-o-directory", ("compile", "net.cnn", "-o", "adir"), "cannot write adir (-o): is a directory"),
    case("train-log-directory", (*TRAIN, *OUTS, "--log", "adir"), "cannot write adir (--log): is a directory"),
    case("compile-o-fifo", ("compile", "net.cnn", "-o", "fifo"), "cannot write fifo (-o): not a regular file"),
    case("compile-o-below-a-file", ("compile", "net.cnn", "-o", "net.cnn/a"), "net.cnn is not a directory"),
    case("compile-o-no-permission", ("compile", "net.cnn", "-o", "/sys/cnnc-test.cnnc"), "Permission denied",
         linux=True),
    # input files that cannot be read, or are not what the flag takes
    case("check-directory", ("check", "adir"), "adir: is a directory"),
    case("check-fifo", ("check", "fifo"), "fifo: not a regular file"),
    case("check-proc-mem", ("check", "/proc/self/mem"), "cannot read /proc/self/mem", linux=True),
    *[case(f"{command}-an-artifact", (command, "art.cnnc", *more), "art.cnnc is a compiled artifact")
      for command, more in [("check", ()), ("graph", ()), ("compile", ("-o", "o.cnnc")), ("gradcheck", ())]],
    case("run-npy-as-weights", (*RUN, "--weights", "w.npy"), "w.npy: not a weights file"),
    case("eval-garbage-as-weights", ("eval", "net.cnn", "--data", "d.npz", "--weights", "garbage.bin"),
         "garbage.bin: not a weights file"),
    case("compile-npy-as-weights", ("compile", "net.cnn", "--weights", "w.npy", "-o", "o.cnnc"), "not a weights file"),
    case("resume-npy", (*TRAIN, *OUTS, "--resume", "w.npy"), "w.npy: not a cnnc checkpoint"),
    case("resume-garbage", (*TRAIN, *OUTS, "--resume", "garbage.bin"), "garbage.bin: not a cnnc checkpoint"),
    case("resume-flipped-bit", (*TRAIN, *OUTS, "--resume", "flipped.ckpt"), "flipped.ckpt: not a cnnc checkpoint"),
    case("resume-list-metadata", (*TRAIN, *OUTS, "--resume", "listmeta.ckpt"), "not a JSON object"),
    case("run-manifest-without-target", ("run", "notarget.cnnc", "--input", "x.npy"), "cnnc run: "),
    case("run-manifest-a-list", ("run", "list.cnnc", "--input", "x.npy"), "cnnc run: "),
    case("eval-manifest-a-list", ("eval", "list.cnnc", "--data", "d.npz"), "cnnc eval: "),
    case("run-npy-claiming-1e12-values", ("run", "net.cnn", "--input", "huge.npy"), "huge.npy: not a .npy array"),
    case("run-npz-as-input", ("run", "net.cnn", "--input", "d.npz"), "d.npz: an .npz archive"),
    case("train-npz-claiming-1e12-values", ("train", "net.cnn", "--data", "hugedata.npz", *OUTS), "hugedata.npz"),
    case("eval-artifact-without-weights", ("eval", "plain.cnnc", "--data", "d.npz"), "plain.cnnc has no weights"),
    # flag values (items 10 and 13)
    *[case(f"train{flag}={value}", (*TRAIN, *OUTS, flag, value), f"argument {flag}: expected")
      for flag, values in {"--seed": ["-1", "x"], "--batch": ["0", "-3"], "--epochs": ["0", "-1", "1.5"],
                           "--lr": ["-1", "0", "nan", "inf"], "--validation": ["1.5", "1", "-0.1", "nan"],
                           "--patience": ["-1", "0"], "--restarts": ["-1", "0"], "--max-steps": ["0"],
                           "--subset": ["-5"], "--weight-decay": ["-1", "nan"], "--jitter": ["-1", "inf"],
                           "--momentum": ["1.5", "1", "-0.1", "nan"]}.items() for value in values],
    *[case(f"gradcheck{flag}={value}", ("gradcheck", "net.cnn", flag, value), f"argument {flag}: expected")
      for flag, values in {"--batch": ["0", "-3", "1000000000000"], "--samples": ["0", "-1"],
                           "--tolerance": ["nan", "-1"], "--seed": ["-1"]}.items() for value in values],
    case("compile-emit-with-o", ("compile", "net.cnn", "--emit", "llvm", "-o", "f.ll"), "--emit and -o do not go"),
    case("compile-dump-with-weights", ("compile", "net.cnn", "--dump-after", "fuse", "--weights", "w.npz"),
         "--dump-after and --weights do not go together"),
    case("compile-emit-and-dump", ("compile", "net.cnn", "--emit", "asm", "--dump-after", "fuse"),
         "--emit and --dump-after do not go together"),
    *[case(f"empty-{'-'.join(args)}", args, "expected a file name, got ''")
      for args in [("check", ""), ("compile", "net.cnn", "-o", ""), ("run", "net.cnn", "--input", ""),
                   (*TRAIN, *OUTS, "--log", ""), ("train", "net.cnn", "--data", "", *OUTS),
                   ("eval", "art.cnnc", "--data", "d.npz", "--weights", "")]],
    case("train-lr-overflows-float32", (*TRAIN, *OUTS, "--lr", "1e300"), "argument --lr: expected"),
    case("momentum-with-adam-flag", (*TRAIN, *OUTS, "--optimizer", "adam", "--momentum", "0.5"),
         "momentum 0.5 is the beta of sgd with momentum, but the optimizer is adam"),
    case("momentum-with-adam-file", ("train", "adam.cnn", "--data", "d.npz", *OUTS, "--momentum", "0.5"),
         "but the optimizer is adam"),
    case("momentum-with-rmsprop-flag", (*TRAIN, *OUTS, "--optimizer", "rmsprop", "--momentum", "0.5"),
         "the optimizer is rmsprop"),
]


@pytest.mark.parametrize(("args", "expected"), REFUSED)
def test_refused_in_one_line_and_nothing_written(work, args, expected):
    before = snapshot(work)
    line = one_line_error(cnnc_cmd(work, *args))
    assert expected in line
    assert line.startswith("cnnc")
    assert snapshot(work) == before


AS_PROCESSES = ["compile-default-output-is-the-source", "train-o-no-dir", "check-proc-mem", "resume-flipped-bit",
                "run-manifest-a-list", "run-npy-claiming-1e12-values", "train-npz-claiming-1e12-values",
                "train--seed=-1", "gradcheck--batch=0", "eval-artifact-without-weights"]


@pytest.mark.parametrize(("args", "expected"), [p for p in REFUSED if p.id in AS_PROCESSES])
def test_refused_as_a_process(work, args, expected):
    """The real command: exit status 2, one line, no traceback."""
    assert expected in one_line_error(cnnc_process(work, *args))


@pytest.mark.parametrize("value", ["abc", "2.5", "5000", "0", "-1"])
def test_bad_cnnc_threads_is_one_line(work, monkeypatch, value):
    monkeypatch.setenv("CNNC_THREADS", value)
    line = one_line_error(cnnc_cmd(work, *RUN))
    assert line.startswith("cnnc: CNNC_THREADS must be a whole number of threads from 1 to ")


def test_bad_cnnc_threads_in_a_process(work, monkeypatch):
    monkeypatch.setenv("CNNC_THREADS", "abc")
    assert "CNNC_THREADS" in one_line_error(cnnc_process(work, *RUN))


def test_plot_over_the_source_is_refused(work):
    pytest.importorskip("matplotlib")
    before = snapshot(work)
    assert "the input FILE net.cnn" in one_line_error(cnnc_cmd(work, *TRAIN, *OUTS, "--plot", "net.cnn"))
    assert "(--plot): is a directory" in one_line_error(cnnc_cmd(work, *TRAIN, *OUTS, "--plot", "adir"))
    assert snapshot(work) == before


def test_a_source_that_is_not_utf8_is_one_line(work):
    r = cnnc_process(work, "check", "bad-utf8.cnn")
    assert r.returncode in (1, 2)
    assert "Traceback" not in r.stderr and "bad-utf8.cnn" in r.stderr


# ---- writes that fail midway: a full disk ----------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_weights_on_a_full_disk(work, monkeypatch):
    from cnnc_runtime import fileio

    monkeypatch.setattr(fileio, "atomic_save_npz", enospc)
    line = one_line_error(cnnc_cmd(work, *TRAIN, "--epochs", "1", "-o", "full.npz", "--checkpoint", "full.ckpt"))
    assert line == "cnnc train: cannot write full.npz: No space left on device"


def test_checkpoint_on_a_full_disk(work, monkeypatch):
    from cnnc_runtime import train

    monkeypatch.setattr(train, "save_checkpoint", enospc)
    line = one_line_error(cnnc_cmd(work, *TRAIN, "--epochs", "1", "-o", "full.npz", "--checkpoint", "full.ckpt"))
    assert line == "cnnc train: cannot write full.ckpt (--checkpoint): No space left on device"


def test_artifact_on_a_full_disk(work, monkeypatch):
    from cnnc_runtime import fileio

    monkeypatch.setattr(fileio, "atomic_write_bytes", enospc)
    line = one_line_error(cnnc_cmd(work, "compile", "net.cnn", "-o", "full.cnnc"))
    assert line == "cnnc compile: cannot write full.cnnc: No space left on device"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_log_on_a_full_device(work):
    r = cnnc_process(work, *TRAIN, "--epochs", "1", "-o", "full.npz", "--checkpoint", "full.ckpt", "--log", "/dev/full")
    assert one_line_error(r).endswith("/dev/full (--log): No space left on device")


# ---- what the top level does with what escapes a command ---------------------------------------------


def test_a_value_error_from_below_is_one_line(work, monkeypatch):
    from cnnc.cli import check

    def bad_value(args, diag):
        raise ValueError("a value the runtime refused\nover two lines")

    monkeypatch.setattr(check, "run", bad_value)
    line = one_line_error(cnnc_cmd(work, "check", "net.cnn"))
    assert line == "cnnc check: a value the runtime refused over two lines"


def test_any_other_exception_is_shown_as_a_bug(work, monkeypatch):
    from cnnc import cli
    from cnnc.cli import check

    def bug(args, diag):
        return {}["missing"]

    monkeypatch.setattr(check, "run", bug)
    r = cnnc_cmd(work, "check", "net.cnn")
    assert r.returncode == cli.BUG_STATUS == 70
    assert "Traceback" in r.stderr and "KeyError: 'missing'" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cnnc check: internal error: this is a bug in cnnc")


# ---- hostile values that have a correct result ----------------------------------------------------------


def train_weights(work: Path, *args: str) -> dict[str, np.ndarray]:
    r = cnnc_cmd(work, *TRAIN, "--epochs", "1", "-o", "ok.npz", "--checkpoint", "ok.ckpt", *args)
    assert r.returncode == 0, r.stderr
    with np.load(work / "ok.npz") as w:
        return dict(w)


def checkpoint_of(work: Path) -> tuple[dict, dict[str, float]]:
    with np.load(work / "ok.ckpt") as z:
        return json.loads(bytes(z["meta"]).decode()), {k[4:]: float(z[k]) for k in z.files if k[4:] in
                                                        ("lr", "beta", "beta1", "beta2", "eps")}


def test_subset_of_uint8_images(work):
    r = cnnc_cmd(work, "train", "net.cnn", "--data", "u8.npz", "--subset", "10", "--epochs", "1", *OUTS)
    assert r.returncode == 0, r.stderr
    assert "(10 images)" in r.stdout


def test_subset_zero_is_all(work):
    r = cnnc_cmd(work, *TRAIN, "--subset", "0", "--epochs", "1", *OUTS)
    assert r.returncode == 0, r.stderr
    assert "(120 images)" in r.stdout


def test_a_batch_larger_than_the_data_is_the_whole_data(work):
    whole = train_weights(work, "--batch", "120")
    huge = train_weights(work, "--batch", "1000000000000")
    for k in whole:
        np.testing.assert_array_equal(whole[k], huge[k], err_msg=k)


@pytest.mark.parametrize(("optimizer", "expected"), [
    ("adam", {"lr": 0.02, "beta1": 0.9, "beta2": 0.999}),
    ("rmsprop", {"lr": 0.02, "beta": 0.9}),  # the file's momentum beta=0.5 means something else to RMSProp
    ("sgd", {"lr": 0.02}),
])
def test_another_optimizer_takes_only_the_files_lr(work, optimizer, expected):
    trained = train_weights(work, "--optimizer", optimizer)
    meta, hyper = checkpoint_of(work)
    assert meta["optimizer"].lower() == optimizer
    assert {k: hyper[k] for k in expected} == pytest.approx(expected)
    model = build(NET)
    with np.load(work / "d.npz") as d:
        model.fit(d["x"], d["y"], epochs=1, optimizer=optimizer, optimizer_args={}, progress=False)
    for k, v in model.params.items():
        np.testing.assert_array_equal(trained[k], v, err_msg=k)


def test_momentum_flag_keeps_the_optimizer_and_sets_beta(work):
    train_weights(work, "--momentum", "0.3")
    meta, hyper = checkpoint_of(work)
    assert meta["optimizer"] == "Momentum" and hyper == pytest.approx({"lr": 0.02, "beta": 0.3})


def test_eval_an_artifact_uses_its_own_weights(work):
    own = cnnc_cmd(work, "eval", "art.cnnc", "--data", "d.npz", "--json")
    assert own.returncode == 0, own.stderr
    given = cnnc_cmd(work, "eval", "net.cnn", "--data", "d.npz", "--weights", "w.npz", "--json")
    assert given.returncode == 0, given.stderr
    assert json.loads(own.stdout) == json.loads(given.stdout)


@pytest.mark.parametrize("checkpoint", [("--checkpoint", "again.ckpt"), ()], ids=["given", "default"])
def test_checkpoint_resumed_and_written_again(work, checkpoint):
    """--resume C with the checkpoint C (given, or the default) is how a run continues: the one output that may be
    an input."""
    ckpt = checkpoint[1] if checkpoint else "blobs.ckpt.npz"
    (work / ckpt).write_bytes((work / "t.ckpt").read_bytes())
    r = cnnc_cmd(work, *TRAIN, "--epochs", "2", "-o", "again.npz", *checkpoint, "--resume", ckpt)
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout
    with np.load(work / ckpt) as z:
        assert json.loads(bytes(z["meta"]).decode())["epoch"] == 2
