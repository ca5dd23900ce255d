"""Signed artifacts: ``cnnc compile --sign KEYFILE`` and ``cnnc.load(path, key=...)`` / ``cnnc run --key KEYFILE``.

An artifact is native code; its checksums are no defence against someone who
rewrites it (they recompute them). A signature made with a secret key is: with
a key, anything but an untouched artifact signed with that key is refused
before its code is mapped.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

import cnnc
from cnnc_runtime import artifact, native, signing
from tests.clitools import cnnc_cmd, one_line_error
from tests.reference import NETWORKS, build

KEY = bytes(range(32))
SMALL = """
network small {
    input x: 2x6x6
    a = x -> conv(3, 3x3, pad=1) -> relu -> maxpool(2x2)
    b = a -> flatten -> dense(4)
}
"""


@pytest.fixture(scope="module")
def model():
    return build(SMALL, seed=2)


@pytest.fixture()
def signed(model, tmp_path):
    path = tmp_path / "small.cnnc"
    model.save_artifact(path, key=KEY)
    return path


def forged(path, change) -> bytes:
    """`path` changed by someone without the key: sections rewritten, checksums recomputed, old signature kept."""
    data = path.read_bytes()
    manifest, obj, weights = artifact.unpack(data)
    body = artifact.pack(*change(manifest, obj, weights))
    return body + data[-(8 + signing.TAG_BYTES):]


def test_signed_round_trip(model, signed, tmp_path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(cnnc.load(signed, key=KEY)(x), model(x))
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    np.testing.assert_array_equal(cnnc.load(signed, key=keyfile)(x), model(x))
    np.testing.assert_array_equal(cnnc.load(signed, key=str(keyfile))(x), model(x))
    np.testing.assert_array_equal(cnnc.load(signed)(x), model(x))  # without a key: as trusted as any artifact


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def _weights_changed(m, o, w):
    with np.load(io.BytesIO(w)) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["b.weight"] = arrays["b.weight"] + 1
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return m, o, buf.getvalue()


TAMPERING = {
    "code": lambda m, o, w: (m, flip(o, len(o) // 2), w),
    "code garbage": lambda m, o, w: (m, b"", w),  # would be refused anyway: the signature is checked first
    "manifest": lambda m, o, w: ({**m, "network": "other"}, o, w),
    "manifest layout": lambda m, o, w: ({**m, "arena_infer": 1}, o, w),
    "weights": _weights_changed,
    "weights removed": lambda m, o, w: (m, o, b""),
}


@pytest.mark.parametrize("what", TAMPERING)
def test_tampered_artifacts_are_refused(signed, tmp_path, what) -> None:
    bad = tmp_path / "forged.cnnc"
    bad.write_bytes(forged(signed, TAMPERING[what]))
    with pytest.raises(ValueError, match="signature does not match"):
        cnnc.load(bad, key=KEY)


def test_a_flipped_signature_bit_is_refused(signed) -> None:
    data = bytearray(signed.read_bytes())
    data[-1] ^= 1
    signed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="signature does not match"):
        cnnc.load(signed, key=KEY)


def test_the_wrong_key_is_refused(signed) -> None:
    with pytest.raises(ValueError, match="signature does not match"):
        cnnc.load(signed, key=bytes(reversed(KEY)))


def test_an_unsigned_artifact_is_refused_when_a_key_is_given(model, tmp_path) -> None:
    path = tmp_path / "plain.cnnc"
    model.save_artifact(path)
    with pytest.raises(ValueError, match="not signed"):
        cnnc.load(path, key=KEY)
    stripped = tmp_path / "stripped.cnnc"
    model.save_artifact(stripped, key=KEY)
    stripped.write_bytes(stripped.read_bytes()[:-(8 + signing.TAG_BYTES)])  # the signature cut off
    with pytest.raises(ValueError, match="not signed"):
        cnnc.load(stripped, key=KEY)


def test_no_code_is_mapped_before_the_signature_is_checked(signed, tmp_path, monkeypatch) -> None:
    def never(*args):
        raise AssertionError("code was mapped")

    monkeypatch.setattr(native, "LoadedCode", never)
    monkeypatch.setattr(native, "_mcjit", never)
    bad = tmp_path / "forged.cnnc"
    bad.write_bytes(forged(signed, TAMPERING["code"]))
    with pytest.raises(ValueError, match="signature does not match"):
        cnnc.load(bad, key=KEY)


@pytest.mark.parametrize("key", [b"", b"short", 12345], ids=["empty", "short", "int"])
def test_bad_keys_are_refused(model, tmp_path, key) -> None:
    with pytest.raises(ValueError, match="key"):
        model.save_artifact(tmp_path / "a.cnnc", key=key)
    assert not (tmp_path / "a.cnnc").exists()


def test_a_missing_key_file_is_a_value_error(signed, tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read the key file"):
        cnnc.load(signed, key=tmp_path / "no-such-key")


# ---- the command line ----------------------------------------------------------------------------


@pytest.fixture()
def work(tmp_path):
    (tmp_path / "lenet5.cnn").write_text(NETWORKS["lenet5"])
    (tmp_path / "key").write_bytes(KEY)
    (tmp_path / "other-key").write_bytes(bytes(reversed(KEY)))
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 32, 32), np.float32))
    return tmp_path


def test_cli_sign_and_check(work) -> None:
    r = cnnc_cmd(work, "compile", "lenet5.cnn", "-o", "net.cnnc", "--sign", "key")
    assert r.returncode == 0, r.stderr
    assert "signed" in r.stdout
    r = cnnc_cmd(work, "run", "net.cnnc", "--input", "x.npy", "--key", "key", "-o", "y.npy")
    assert r.returncode == 0, r.stderr
    assert np.load(work / "y.npy").shape == (2, 10)
    assert "signature does not match" in one_line_error(cnnc_cmd(work, "run", "net.cnnc", "--input", "x.npy",
                                                                 "--key", "other-key"))


def test_cli_refuses_an_unsigned_artifact_given_a_key(work) -> None:
    assert cnnc_cmd(work, "compile", "lenet5.cnn", "-o", "net.cnnc").returncode == 0
    line = one_line_error(cnnc_cmd(work, "run", "net.cnnc", "--input", "x.npy", "--key", "key"))
    assert "net.cnnc" in line and "not signed" in line


def test_cli_key_problems_are_one_line(work) -> None:
    assert "cannot read the key file" in one_line_error(
        cnnc_cmd(work, "compile", "lenet5.cnn", "-o", "net.cnnc", "--sign", "missing-key"))
    assert not (work / "net.cnnc").exists()
    (work / "short-key").write_bytes(b"secret")
    assert "at least 16" in one_line_error(
        cnnc_cmd(work, "compile", "lenet5.cnn", "-o", "net.cnnc", "--sign", "short-key"))
    assert "is not an artifact" in one_line_error(cnnc_cmd(work, "run", "lenet5.cnn", "--input", "x.npy",
                                                           "--key", "key"))


def test_help_says_an_artifact_is_code(work) -> None:
    from cnnc.cli import build_parser

    for command in ("run", "compile"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        assert "as a shared library would" in " ".join(sub.format_help().split())
