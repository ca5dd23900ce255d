"""Artifacts (native code + manifest + weights in one file) and the on-disk compile cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cnnc
from cnnc_runtime import artifact
from tests.reference import NETWORKS, build

LENET5 = NETWORKS["lenet5"]
ROOT = Path(__file__).resolve().parents[2]

SMALL = """
network small {
    input x: 2x6x6
    a = x -> conv(3, 3x3, pad=1) -> relu -> maxpool(2x2)
    b = a -> flatten -> dense(4)
}
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """LeNet-5 with non-default weights, saved as an artifact; (model, path, batch)."""
    model = build(LENET5, seed=3)
    model.params["logits.bias"][...] = np.linspace(-1, 1, 10)
    path = tmp_path_factory.mktemp("artifact") / "lenet5.cnnc"
    model.save_artifact(path)
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    return model, path, x


def test_round_trip_gives_identical_outputs(saved) -> None:
    model, path, x = saved
    loaded = cnnc.load(path)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert loaded.name == "lenet5"
    assert loaded.input_shape == (1, 32, 32) and loaded.output_shape == (10,)
    for k, v in model.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    v1, g1 = model.value_and_grad(x, np.array([0, 1, 2, 3]))
    v2, g2 = loaded.value_and_grad(x, np.array([0, 1, 2, 3]))
    assert v1 == v2
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    assert loaded.summary() == model.summary()


def test_artifact_without_weights_gets_seeded_weights(tmp_path) -> None:
    model = build(LENET5, seed=0)
    model.params["c1.bias"][...] = 5.0
    model.save_artifact(tmp_path / "bare.cnnc", with_weights=False)
    loaded = cnnc.load(tmp_path / "bare.cnnc")
    fresh = build(LENET5, seed=0)
    for k in fresh.params:
        np.testing.assert_array_equal(loaded.params[k], fresh.params[k])


def test_loads_without_the_compiler(saved, tmp_path) -> None:
    """Only numpy and llvmlite: lark and networkx (the front end's) cannot be imported in this process."""
    model, path, x = saved
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["lark"] = None          # any 'import lark' now raises ImportError
        sys.modules["networkx"] = None
        import numpy as np
        import cnnc_runtime.model
        m = cnnc_runtime.model.load({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, m(np.load({str(tmp_path / "x.npy")!r})))
        real = [name for name in ("lark", "networkx") if sys.modules.get(name) is not None]
        assert not real, real
        assert not any(k == "cnnc" or k.startswith("cnnc.") for k in sys.modules), "the compiler was imported"
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), model(x))


# ---- tampered artifacts ---------------------------------------------------------------------------


def _tampered(saved, tmp_path, change) -> Path:
    _, path, _ = saved
    manifest, obj, weights = artifact.unpack(path.read_bytes())
    manifest, obj, weights = change(manifest, obj, weights)
    out = tmp_path / "tampered.cnnc"
    out.write_bytes(artifact.pack(manifest, obj, weights))
    return out


def test_bad_magic(saved, tmp_path) -> None:
    _, path, _ = saved
    bad = tmp_path / "bad.cnnc"
    bad.write_bytes(b"NOTCNNC!" + path.read_bytes()[8:])
    with pytest.raises(ValueError, match="not a cnnc artifact"):
        cnnc.load(bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="not a cnnc artifact"):
        cnnc.load(bad)


@pytest.mark.parametrize("keep", [8, 12, 100, 0.5, -1])
def test_truncated(saved, tmp_path, keep) -> None:
    _, path, _ = saved
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "short.cnnc"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match="truncated cnnc artifact"):
        cnnc.load(bad)


def test_corrupt_manifest(saved, tmp_path) -> None:
    _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[16] = 0xFF  # the manifest's first byte: no longer JSON (nor UTF-8)
    bad = tmp_path / "garbled.cnnc"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        cnnc.load(bad)


def test_future_format_is_refused(saved, tmp_path) -> None:
    bad = _tampered(saved, tmp_path, lambda m, o, w: ({**m, "format": 999}, o, w))
    with pytest.raises(ValueError, match="artifact format 999 is not supported"):
        cnnc.load(bad)


def test_other_cnnc_version_is_refused(saved, tmp_path) -> None:
    bad = _tampered(saved, tmp_path, lambda m, o, w: ({**m, "cnnc_version": "9.9.0"}, o, w))
    with pytest.raises(ValueError, match="built by cnnc 9.9.0"):
        cnnc.load(bad)


def test_missing_cpu_feature_is_refused(saved, tmp_path) -> None:
    def change(m, o, w):
        t = dict(m["target"])
        t["features"] = ",".join(f for f in [t["features"], "+amx-tile"] if f)
        return {**m, "target": t}, o, w

    bad = _tampered(saved, tmp_path, change)
    from cnnc_runtime.host import host_cpu

    if "+amx-tile" in host_cpu()[2].split(","):
        pytest.skip("this CPU has AMX")
    with pytest.raises(ValueError, match="this CPU lacks amx-tile"):
        cnnc.load(bad)


def test_other_architecture_is_refused(saved, tmp_path) -> None:
    def change(m, o, w):
        return {**m, "target": {**m["target"], "triple": "aarch64-unknown-linux-gnu"}}, o, w

    with pytest.raises(ValueError, match="built for aarch64"):
        cnnc.load(_tampered(saved, tmp_path, change))


def test_weights_that_do_not_fit_are_refused(saved, tmp_path) -> None:
    import io

    def change(m, o, w):
        buf = io.BytesIO()
        np.savez(buf, **{"c1.weight": np.zeros((6, 1, 5, 5), np.float32)})
        return m, o, buf.getvalue()

    with pytest.raises(ValueError, match="missing"):
        cnnc.load(_tampered(saved, tmp_path, change))


# ---- the compile cache ---------------------------------------------------------------------------


def test_cache_second_compile_is_faster_and_identical(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    first = cnnc.compile_string(SMALL)
    t1 = time.perf_counter()
    second = cnnc.compile_string(SMALL)
    t2 = time.perf_counter()
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # one entry keyed by the optimised IR, one by the exact source text (read without parsing)
    assert len(entries) == 2 and all(e.endswith(".cnnc") for e in entries)
    assert sum(e.startswith("src-") for e in entries) == 1
    assert t2 - t1 < 0.5 * (t1 - t0), (t1 - t0, t2 - t1)
    assert json.dumps(first.manifest, sort_keys=True) == json.dumps(second.manifest, sort_keys=True)
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(first(x), second(x))
    # cache=False neither reads nor writes the cache
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path / "other"))
    cnnc.compile_string(SMALL, cache=False)
    assert not (tmp_path / "other").exists()


def test_corrupt_cache_entry_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    good = cnnc.compile_string(SMALL)
    entries = list(tmp_path.iterdir())
    keys = {e: artifact.read(e)[0]["cache_key"] for e in entries}
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 6)).astype(np.float32)
    for entry in entries:
        entry.write_bytes(b"garbage" * 100)
    again = cnnc.compile_string(SMALL)
    np.testing.assert_array_equal(again(x), good(x))
    assert again.manifest == good.manifest
    for entry in entries:  # each entry was rewritten whole
        assert artifact.read(entry)[0]["cache_key"] == keys[entry]


def test_unwritable_cache_only_costs_time(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CNNC_CACHE_DIR", str(blocker / "cache"))
    model = cnnc.compile_string(SMALL)
    assert model(np.zeros((1, 2, 6, 6), np.float32)).shape == (1, 4)


def test_damaged_code_is_refused_before_it_reaches_llvm(tmp_path) -> None:
    """Flipped bits in the object code: a ValueError from the checksum, not a crash inside LLVM."""
    model = build(SMALL)
    path = tmp_path / "a.cnnc"
    model.save_artifact(path)
    data = bytearray(path.read_bytes())
    manifest, obj, _ = artifact.read(path)
    start = bytes(data).index(obj)
    for i in range(start + 64, start + len(obj) - 64, 97):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        cnnc.load(path)


# ---- hand-edited manifests -------------------------------------------------------------------------


def _edit(path: str, value):
    """A change to the manifest: set the field at dotted `path` (list indices as numbers) to `value`, or delete it."""
    def change(m, o, w):
        m = json.loads(json.dumps(m))
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = m
        for k in parents:
            node = node[k]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return m, o, w
    return change


DELETE = object()
BAD_FIELDS = [  # (change, the field the error names)
    ("target", DELETE, "target"),
    ("target.cpu", 7, "target.cpu"),
    ("network", None, "network"),
    ("input.shape", [1, 32], "input.shape"),
    ("input.shape", [1, 0, 32], "input.shape"),
    ("input.shape", [1, 32, 32.0], "input.shape"),
    ("output.shape", "10", "output.shape"),
    ("loss_inputs.mse", -1, "loss_inputs.mse"),
    ("arena_infer", "1", "arena_infer"),
    ("arena_train", True, "arena_train"),
    ("ws_floats", -5, "ws_floats"),
    ("param_floats", 2**50, "param_floats"),
    ("params", {}, "params"),
    ("params.0", [], "params[0]"),
    ("params.0.size", 151, "params[0].size"),
    ("params.0.shape", [6, 1, 5, -5], "params[0].shape"),
    ("params.1.offset", 0, "params"),  # on top of params[0]
    ("params.3.offset", 61750, "params[3].offset"),  # past the end
    ("params.2.name", "c1.weight", "params[2].name"),
    ("params.0.kind", "gamma", "params[0].kind"),
    ("params.0.trainable", "yes", "params[0].trainable"),
    ("params.0.init.scheme", "xavier", "params[0].init.scheme"),
    ("params.0.connect", [[0]], "params[0].connect"),
    ("params.0.fixed", [[1.0]], "params[0].fixed"),
    ("updates.sgd", "lr", "updates.sgd"),
    ("has_dropout", 0, "has_dropout"),
    ("train", [], "train"),
    ("train.epochs", "ten", "train.epochs"),
    ("train.seed", -1, "train.seed"),  # the rules .cnn files and fit obey (numpy would refuse it much later)
    ("train.validation", 1.5, "train.validation"),
    ("train.optimizer", {"name": "adam", "beta1": 1.5}, "train.optimizer.beta1"),
    ("train.early_stop", {"patience": 0, "min_delta": 0.0}, "train.early_stop.patience"),
    ("train.loss", "hinge", "train.loss"),
    ("train.normalize", {"mean": 0.1, "std": 0}, "train.normalize.std"),
    ("train.normalize", {"mean": [0.1, "a"], "std": 1}, "train.normalize.mean"),
    ("train.normalize", {"mean": [], "std": 1}, "train.normalize.mean"),
    ("train.schedule", {"name": "cosin"}, "train.schedule"),
    ("train.schedule", {"name": "step", "every": 0}, "train.schedule"),
    ("train.crop", -1, "train.crop"),
    ("train.flip", 1, "train.flip"),
    ("train.label_smoothing", 1.0, "train.label_smoothing"),
    ("train.clip_norm", 0, "train.clip_norm"),
    ("train.warmup", 0.5, "train.warmup"),
    ("train.optimizer", {"lr": 0.1}, "train.optimizer.name"),
    ("summary", DELETE, "summary"),
]


@pytest.mark.parametrize(("field", "value", "named"), BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS])
def test_a_hand_edited_manifest_names_the_bad_field(saved, tmp_path, field, value, named) -> None:
    bad = _tampered(saved, tmp_path, _edit(field, value))
    with pytest.raises(ValueError, match="^" + re.escape(f"{bad}: manifest field '{named}'")):
        cnnc.load(bad)


def test_a_manifest_that_is_not_an_object_is_refused(saved, tmp_path) -> None:
    _, path, _ = saved
    _, obj, weights = artifact.read(path)
    for manifest in ([1, 2], "lenet5", None, 3):
        bad = tmp_path / "list.cnnc"
        bad.write_bytes(artifact.pack(manifest, obj, weights))
        with pytest.raises(ValueError, match="corrupt manifest .*expected an object"):
            cnnc.load(bad)


LIES = [  # consistent manifests that describe other code than theirs: (change, the field named)
    ("arena_infer", 1, "arena_infer"), ("arena_train", 64, "arena_train"), ("ws_floats", 0, "ws_floats"),
    ("param_floats", 2 * 61760, "param_floats"), ("input.shape", [1, 28, 28], "input.shape"),
    ("output.shape", [100], "output.shape"), ("loss_inputs.cross_entropy", 2, "loss_inputs"),
    ("has_dropout", True, "has_dropout"), ("params.1.offset", 168, "params[1]"),
    ("ws_cache_floats", 16, "ws_cache_floats"),
]


def test_a_manifest_must_describe_the_layout_its_code_was_compiled_for(saved, tmp_path) -> None:
    """Sizes the code does not have (arena_infer=1 used to segfault) are refused before any of the code is mapped.

    Run in a fresh process: before this check, running such a model crashed the interpreter.
    """
    model, path, x = saved
    np.save(tmp_path / "x.npy", x)
    files = []
    for i, (field, value, _) in enumerate(LIES):
        files.append(str(_tampered(saved, tmp_path, _edit(field, value)).rename(tmp_path / f"lie{i}.cnnc")))
    script = textwrap.dedent(f"""
        import numpy as np
        import cnnc
        x = np.load("x.npy")
        for path in {files!r}:
            try:
                m = cnnc.load(path)
                m(np.concatenate([x] * 8))
                m.value_and_grad(x, np.arange(4))
                print("loaded and ran", path)
            except ValueError as e:
                print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(LIES), done.stdout
    for (_, _, named), line in zip(LIES, lines):
        assert f"manifest field '{named}'" in line and "the code was compiled for" in line, line


def test_code_without_an_entry_point_is_refused(saved, tmp_path) -> None:
    bad = _tampered(saved, tmp_path, _edit("updates.lion", ["lr"]))
    with pytest.raises(ValueError, match="no function update_lion"):
        cnnc.load(bad)


def test_unreadable_weights_are_a_value_error(saved, tmp_path) -> None:
    for weights in (b"PK\x03\x04 not a zip", b"\x00" * 100):
        bad = _tampered(saved, tmp_path, lambda m, o, w, weights=weights: (m, o, weights))
        with pytest.raises(ValueError, match="weights cannot be read"):
            cnnc.load(bad)


def test_trailing_bytes_are_refused(saved, tmp_path) -> None:
    _, path, _ = saved
    bad = tmp_path / "long.cnnc"
    bad.write_bytes(path.read_bytes() + b"\x00" * 7)
    with pytest.raises(ValueError, match="unexpected bytes after its sections"):
        cnnc.load(bad)


# ---- fuzzing the reader: flipped bits, cut-off files, hand-edited manifests ---------------------------

READER_FUZZ = """
    import json, math, sys
    import numpy as np
    import cnnc
    from cnnc_runtime import artifact

    good = open("good.cnnc", "rb").read()
    manifest, obj, weights = artifact.unpack(good)
    x = np.random.default_rng(0).standard_normal((9, 2, 6, 6)).astype(np.float32)
    VALUES = [None, True, False, 0, -1, 1, 3, 2**62, -2**70, 0.5, 1e308, math.nan, math.inf, "", "x", [], {},
              [1, 2], [[0]], {"a": 1}, [[[[[]]]]], "weight"]

    def mutate(node, rng):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = keys[int(rng.integers(len(keys)))]
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
            return mutate(child, rng)
        roll = rng.random()
        if isinstance(node, dict) and roll < 0.15:
            del node[key]
        elif isinstance(child, int) and not isinstance(child, bool) and roll < 0.5:
            node[key] = child + int(rng.choice([-64, -1, 1, 16, child + 1]))
        else:
            node[key] = VALUES[int(rng.integers(len(VALUES)))]

    def variant(seed):
        rng = np.random.default_rng(seed)
        kind = seed % 4
        if kind == 0:  # bits flipped anywhere
            data = bytearray(good)
            for at in rng.integers(0, len(data), size=rng.integers(1, 4)):
                data[at] ^= 1 << int(rng.integers(8))
            return bytes(data)
        if kind == 1:  # cut off
            return good[:int(rng.integers(0, len(good)))]
        m = json.loads(json.dumps(manifest))
        for _ in range(int(rng.integers(1, 3))):
            mutate(m, rng)
        if kind == 3 and rng.random() < 0.1:
            m = [m]
        return artifact.pack(m, obj, weights)  # hand-edited: the checksums recomputed

    outcomes = {}
    for seed in range(int(sys.argv[1])):
        open("bad.cnnc", "wb").write(variant(seed))
        try:
            model = cnnc.load("bad.cnnc")
            model(x)
            model.value_and_grad(x, np.arange(9) % 4)
            outcome = "loaded"
        except ValueError:
            outcome = "ValueError"
        except Exception as e:  # anything else is a bug: reported with its seed
            outcome = f"{type(e).__name__} (seed {seed}): {str(e)[:200]}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(json.dumps(outcomes))
"""


def test_fuzzed_artifacts_load_or_raise_value_error(tmp_path) -> None:
    """Flipped bits, cut-off files and randomly hand-edited manifests (checksums recomputed): each artifact loads
    and runs, or is a ValueError; never another exception, never a crash (the loop runs in a fresh process).
    """
    build(SMALL, seed=1).save_artifact(tmp_path / "good.cnnc")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(READER_FUZZ), "400"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout)
    assert set(outcomes) <= {"loaded", "ValueError"}, outcomes
    assert outcomes["ValueError"] > 200, outcomes


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["format", "target", "input", "output", "loss_inputs", "param_floats", "arena_infer",
                              "params", "updates", "has_dropout", "train", "summary", "warnings"]),
       value=JSON)
def test_validate_any_json_in_any_field(saved, field, value) -> None:
    """Whatever JSON a field holds, ``validate`` passes or raises ValueError; what passes has a contract."""
    manifest = {**saved[0].manifest, field: value}
    try:
        artifact.validate(manifest)
    except ValueError:
        return
    artifact.contract(manifest)
    artifact.entry_points(manifest)


def test_cli_hand_edited_manifest_is_one_line(saved, tmp_path) -> None:
    from tests.clitools import cnnc_cmd, one_line_error

    _, _, x = saved
    np.save(tmp_path / "x.npy", x)
    for change, named in ((_edit("target", DELETE), "target"), (_edit("arena_infer", 1), "arena_infer")):
        bad = _tampered(saved, tmp_path, change)
        line = one_line_error(cnnc_cmd(tmp_path, "run", bad.name, "--input", "x.npy"))
        assert line.startswith(f"cnnc run: {bad.name}: manifest field '{named}'"), line


@pytest.mark.skipif(sys.platform != "linux", reason="the object code is checked as ELF on Linux")
def test_code_that_promises_infer_split_but_lacks_it_is_refused(tmp_path, monkeypatch) -> None:
    """The code records infer_parts 2 (one image shared by two threads), but its infer_split symbol was renamed:
    refused when loaded, on any thread count (was a KeyError on two threads)."""
    from tests.runtime.test_batchnorm import model
    from tests.runtime.test_inference_split import SPLITNET

    path = tmp_path / "split.cnnc"
    model(SPLITNET, threads=2).save_artifact(path)
    manifest, obj, weights = artifact.unpack(path.read_bytes())
    assert manifest["infer_parts"] == 2 and obj.count(b"infer_split\x00") == 1
    path.write_bytes(artifact.pack(manifest, obj.replace(b"infer_split\x00", b"infer_splix\x00"), weights))
    for threads in ("1", "2"):
        with monkeypatch.context() as m:
            m.setenv("CNNC_THREADS", threads)
            with pytest.raises(ValueError, match="the object code has no function infer_split"):
                cnnc.load(path)


@pytest.mark.skipif(sys.platform != "linux", reason="the object code is checked as ELF on Linux")
def test_the_kept_winograd_weights_region_is_part_of_the_layout(tmp_path) -> None:
    """Inference's kernels write their kept Winograd weights in front of each thread's workspace: a manifest that
    promises less room there than the code uses is refused; code compiled before the field (none recorded, no
    region) loads as it did."""
    from tests.runtime.test_batchnorm import model
    from tests.runtime.test_inference_split import SPLITNET

    path = tmp_path / "split.cnnc"
    model(SPLITNET, threads=2).save_artifact(path)
    manifest, obj, weights = artifact.unpack(path.read_bytes())
    assert manifest["ws_cache_floats"] > 0 and manifest["infer_handoff"] is True
    for lie in (0, manifest["ws_cache_floats"] - 16):
        path.write_bytes(artifact.pack({**manifest, "ws_cache_floats": lie}, obj, weights))
        with pytest.raises(ValueError, match="manifest field 'ws_cache_floats'"):
            cnnc.load(path)
    saved = {k: v for k, v in manifest.items() if k != "ws_cache_floats"}
    assert artifact.contract(saved)["ws_cache_floats"] == artifact.UNRECORDED["ws_cache_floats"] == 0
