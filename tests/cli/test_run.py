"""`cnnc compile` and `cnnc run` on a tiny network, through ``cnnc.cli.main`` in this process (fast) and,
for the exit statuses and the absence of tracebacks, through the command in a subprocess.

The compile cache lives in a fresh directory for this module, so a stale cache
entry can never hide a change in code generation.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import cnnc
from tests.clitools import cache_dir, cnnc_cmd, cnnc_process, one_line_error

NET = """
network tiny {
    input image: 1x6x6
    c = image -> conv(2, 3x3) -> relu
    y = c -> flatten -> dense(3) -> tanh
}
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_run")
    (d / "tiny.cnn").write_text(NET)
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((5, 1, 6, 6)).astype(np.float32))
    with cache_dir(d / "cache"):
        yield d


@pytest.fixture(scope="module")
def reference(work):
    """What the Python API computes for the same file (initial weights, seed 0)."""
    model = cnnc.compile(work / "tiny.cnn", cache=False)
    return model


@pytest.fixture(scope="module")
def artifact(work):
    r = cnnc_process(work, "compile", "tiny.cnn", "-o", "out.cnnc")
    assert r.returncode == 0, r.stderr
    assert re.match(r"wrote out\.cnnc \([0-9,]+ bytes, .+, network tiny\)$", r.stdout.strip()), r.stdout
    return work / "out.cnnc"


def test_compile_then_run_equals_the_python_api(work, artifact, reference):
    r = cnnc_process(work, "run", "out.cnnc", "--input", "x.npy", "-o", "y.npy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "wrote y.npy: 5 outputs of shape (3,)"
    y = np.load(work / "y.npy")
    x = np.load(work / "x.npy")
    assert y.shape == (5, 3) and y.dtype == np.float32
    np.testing.assert_array_equal(y, reference(x))


def test_run_a_cnn_file_directly_and_print(work, reference):
    r = cnnc_cmd(work, "run", "tiny.cnn", "--input", "x.npy")
    assert r.returncode == 0, r.stderr
    printed = np.array([[float(v) for v in line.strip(" []").split()] for line in r.stdout.strip().splitlines()])
    np.testing.assert_allclose(printed, reference(np.load(work / "x.npy")), atol=1e-5)


def test_run_with_weights(work, artifact, reference):
    rng = np.random.default_rng(1)
    weights = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in reference.params.items()}
    np.savez(work / "w.npz", **weights)
    model = cnnc.compile(work / "tiny.cnn", cache=False)
    model.load(work / "w.npz")
    x = np.load(work / "x.npy")
    want = model(x)
    assert not np.allclose(want, reference(x))
    for source in ("tiny.cnn", "out.cnnc"):
        r = cnnc_cmd(work, "run", source, "--input", "x.npy", "--weights", "w.npz", "-o", f"yw_{source}.npy")
        assert r.returncode == 0, r.stderr
        np.testing.assert_array_equal(np.load(work / f"yw_{source}.npy"), want)
    # weights stored in the artifact by `cnnc compile --weights`
    r = cnnc_cmd(work, "compile", "tiny.cnn", "--weights", "w.npz", "-o", "withw.cnnc")
    assert r.returncode == 0, r.stderr
    r = cnnc_cmd(work, "run", "withw.cnnc", "--input", "x.npy", "-o", "y2.npy")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(work / "y2.npy"), want)
    np.testing.assert_array_equal(cnnc.load(work / "withw.cnnc")(x), want)


def test_emit_llvm(work):
    r = cnnc_cmd(work, "compile", "--emit", "llvm", "tiny.cnn")
    assert r.returncode == 0, r.stderr
    assert 'define void @"infer"' in r.stdout
    assert "step_cross_entropy" in r.stdout
    assert re.search(r'define void @"step_cross_entropy"\(', r.stdout)
    assert not (work / "tiny.cnnc").exists()  # --emit writes no artifact


def test_emit_asm(work):
    r = cnnc_cmd(work, "compile", "--emit", "asm", "tiny.cnn")
    assert r.returncode == 0, r.stderr
    asm = r.stdout
    assert len(asm) > 1000
    assert re.search(r"^infer:", asm, re.MULTILINE)
    assert re.search(r"^\s+\.(text|globl|p2align|section)\b", asm, re.MULTILINE)
    assert re.search(r"^\s+(ret|retq)\b", asm, re.MULTILINE)


def test_emit_dot(work):
    r = cnnc_cmd(work, "compile", "--emit", "dot", "tiny.cnn")
    assert r.returncode == 0, r.stderr
    dot = r.stdout.strip()
    assert dot.startswith('digraph "tiny" {') and dot.endswith("}")
    assert "conv+relu" in dot and "dense+tanh" in dot  # the fused graph
    assert "\\nrelu\\n" not in dot
    assert re.search(r"n\d+ -> n\d+;", dot)


def test_dump_after_fuse_lists_fused_nodes(work):
    r = cnnc_cmd(work, "compile", "--dump-after", "fuse", "tiny.cnn")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "; graph after pass 'fuse'"
    conv = next(line for line in lines if line.split()[:2] == ["c", "conv"])
    assert "act=relu" in conv and "fused=c.relu" in conv
    assert any("act=tanh" in line for line in lines)
    assert not any(line.split()[1:2] == ["relu"] for line in lines[2:])  # the relu node is gone


def test_dump_after_shapes_has_unfused_nodes(work):
    r = cnnc_cmd(work, "compile", "--dump-after", "shapes", "tiny.cnn")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "; graph after pass 'shapes'"
    assert "act=" not in r.stdout
    assert re.search(r"^\s+c\.relu\s+relu\s+\(c\) -> 2x4x4", r.stdout, re.MULTILINE)


def test_unknown_pass_name(work):
    line = one_line_error(cnnc_cmd(work, "compile", "--dump-after", "fusion", "tiny.cnn"))
    from cnnc.passes import PASS_NAMES

    assert {"prune", "shapes", "counts", "fuse"} <= set(PASS_NAMES)
    assert line == f"cnnc compile: unknown pass 'fusion'; passes: {', '.join(PASS_NAMES)}"


def test_wrong_shape_input(work, artifact):
    np.save(work / "bad.npy", np.zeros((2, 1, 7, 6), np.float32))
    want = ("cnnc run: bad.npy: expected input of shape (N, 1, 6, 6), got (2, 1, 7, 6): images of 7x6 are larger "
            "than the network input shape (1, 6, 6)")
    assert one_line_error(cnnc_process(work, "run", "out.cnnc", "--input", "bad.npy")) == want
    assert one_line_error(cnnc_cmd(work, "run", "tiny.cnn", "--input", "bad.npy")) == want


def test_wrong_rank_and_dtype_inputs(work, artifact):
    np.save(work / "flat.npy", np.zeros((2, 35), np.float32))  # (36 values would be one 1x6x6 image each)
    assert "expected input of shape (N, 1, 6, 6), got (2, 35)" in one_line_error(
        cnnc_cmd(work, "run", "out.cnnc", "--input", "flat.npy"))
    np.save(work / "strings.npy", np.full((2, 1, 6, 6), "a"))
    assert "expected input of shape (N, 1, 6, 6)" in one_line_error(
        cnnc_cmd(work, "run", "out.cnnc", "--input", "strings.npy"))


def test_missing_files(work, artifact):
    assert one_line_error(cnnc_process(work, "run", "out.cnnc", "--input", "nope.npy")) == \
        "cnnc: nope.npy: no such file"
    assert one_line_error(cnnc_cmd(work, "run", "nope.cnnc", "--input", "x.npy")) == "cnnc: nope.cnnc: no such file"
    assert one_line_error(cnnc_cmd(work, "compile", "nope.cnn")) == "cnnc: nope.cnn: no such file"
    assert one_line_error(cnnc_cmd(work, "run", "out.cnnc", "--input", "x.npy", "--weights", "nope.npz")) == \
        "cnnc: nope.npz: no such file"


def test_run_needs_an_input(work):
    line = one_line_error(cnnc_cmd(work, "run", "tiny.cnn"))
    assert "--input" in line and "required" in line


def test_an_input_that_is_not_npy(work):
    (work / "text.npy").write_text("hello\n")
    line = one_line_error(cnnc_cmd(work, "run", "tiny.cnn", "--input", "text.npy"))
    assert line.startswith("cnnc run: text.npy: not a .npy array")


def test_bad_emit_choice(work):
    line = one_line_error(cnnc_cmd(work, "compile", "--emit", "wasm", "tiny.cnn"))
    assert "wasm" in line


def test_a_mistake_in_the_file_exits_1(work):
    (work / "bad.cnn").write_text("network b {\n    input x: 4\n    y = x -> relux\n}\n")
    r = cnnc_process(work, "run", "bad.cnn", "--input", "x.npy")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("bad.cnn:3:14: error: unknown layer 'relux'")


def test_weights_of_another_network_are_one_line(work, artifact):
    np.savez(work / "other.npz", foo=np.zeros(3, np.float32))
    line = one_line_error(cnnc_process(work, "run", "out.cnnc", "--input", "x.npy", "--weights", "other.npz"))
    assert "does not match network tiny" in line
    line = one_line_error(cnnc_process(work, "compile", "tiny.cnn", "--weights", "other.npz", "-o", "o.cnnc"))
    assert "does not match network tiny" in line


def test_a_corrupt_weights_file_is_one_line(work, artifact):
    (work / "junk.npz").write_text("not an archive\n")
    line = one_line_error(cnnc_process(work, "run", "out.cnnc", "--input", "x.npy", "--weights", "junk.npz"))
    assert "junk.npz" in line
