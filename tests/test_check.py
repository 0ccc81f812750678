"""`tandem check MODEL`: passes on models that serve, fails with the reason otherwise.

The end-to-end command line runs once in a subprocess; every other case calls
`tandem`'s `main` in this process (one TensorFlow start for the whole file).
Every zoo model (`tests/_zoo.py`) is saved and checked, as a user would
before serving it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_tandem
from _zoo import ZOO
from keras_tandem import cli
from keras_tandem.check import InputMaker, compare_outputs, domain_of

FAST = ["--seconds", "0.02", "--threads", "1,2"]


def _mlp() -> keras.Model:
    inputs = keras.Input((6,), name="features")
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="scores")(hidden))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved MLP file, and a base directory whose newest version (2) holds another."""
    root = tmp_path_factory.mktemp("check")
    _mlp().save(root / "mlp.keras")
    for version in (1, 2):
        (root / "base" / str(version)).mkdir(parents=True)
        _mlp().save(root / "base" / str(version) / "model.keras")
    return root


def _check(tmp_path, *argv) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    code = cli.main(["check", *map(str, argv), "--json", str(out)])
    return code, json.loads(out.read_text())


def test_the_command_passes_on_a_keras_file_and_writes_the_whole_report(saved, tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_tandem.cli", "check", str(saved / "mlp.keras"),
         "--json", str(out), *FAST], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: " in proc.stdout and "tandem serve" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["verdict"].startswith("OK")
    assert report["version"] == 1
    assert report["inputs"] == [{"name": "features", "shape": [6], "dtype": "float32",
                                 "values": "standard normal"}]
    assert report["outputs"] == [{"name": "scores", "shape": [3], "dtype": "float32"}]
    assert report["call_path"]
    assert [c["case"] for c in report["answers"]] == [
        "one example", "a batch of 5", "8 threads at once"]
    assert all(c["ok"] and c["max_abs_diff"] <= 1e-4 for c in report["answers"])
    rows = {(r["technique"], r["threads"]): r for r in report["speed"]}
    assert set(rows) == {(t, n) for t in ("Predictor", "model.predict per request",
                                          "lock + predict_on_batch") for n in (1, 2)}
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in rows.values())


def test_a_base_directory_checks_its_newest_version(saved, tmp_path):
    code, report = _check(tmp_path, saved / "base", "--no-speed")
    assert code == 0, report["reason"]
    assert report["version"] == 2
    assert report["file"] == str(saved / "base" / "2" / "model.keras")
    assert report["speed"] == [] and report["ok"]


def _text_file(folder):
    (folder / "notes.txt").write_text("not a model")
    return folder / "notes.txt"


def _saved_model(folder):
    (folder / "saved_model.pb").write_bytes(b"")
    return folder


def test_a_base_directory_skips_a_newest_version_still_being_written(saved, tmp_path):
    from keras_tandem.server import locate_model

    base = tmp_path / "base"
    shutil.copytree(saved / "base", base)
    (base / "3").mkdir()
    (base / "3" / "model.keras").write_bytes(b"PK\x03\x04 half a zip")
    assert locate_model(base) == (base / "2" / "model.keras", 2)


@pytest.mark.parametrize("make, reason", [
    (lambda folder: folder / "missing.keras", "does not exist"),
    (_text_file, "not a complete .keras file"),
    (lambda folder: folder, "no numbered version subdirectory"),
    (_saved_model, "is not a valid SavedModel"),
])
def test_a_path_that_is_not_a_servable_model_fails_with_the_reason(tmp_path, make, reason):
    target = tmp_path / "target"
    target.mkdir()
    code, report = _check(tmp_path, make(target))
    assert code == 1
    assert report["ok"] is False
    assert reason in report["reason"] and report["verdict"] == f"FAIL: {report['reason']}"


def test_answers_that_differ_from_model_predict_fail(saved, tmp_path, monkeypatch):
    real = keras_tandem.Predictor.predict

    def off_by_half(self, x, **kwargs):
        return real(self, x, **kwargs) + 0.5

    monkeypatch.setattr(keras_tandem.Predictor, "predict", off_by_half)
    code, report = _check(tmp_path, saved / "mlp.keras")
    assert code == 1 and not report["ok"]
    assert "differ from model.predict" in report["reason"]
    assert all(not c["ok"] for c in report["answers"])
    assert report["answers"][0]["max_abs_diff"] == pytest.approx(0.5, abs=1e-5)
    assert "output 0: 3 of 3 values differ" in report["answers"][0]["message"]
    assert report["speed"] == []  # nothing is timed once the answers are wrong


def test_a_model_the_predictor_cannot_serve_fails_with_the_reason(saved, tmp_path,
                                                                  monkeypatch):
    def refuse(self, model, **kwargs):
        raise ValueError("cannot tell the input shape")

    monkeypatch.setattr(keras_tandem.Predictor, "__init__", refuse)
    code, report = _check(tmp_path, saved / "mlp.keras")
    assert code == 1
    assert "Predictor cannot serve this model" in report["reason"]
    assert "cannot tell the input shape" in report["reason"]


# ------------------------------------------------------------ generated inputs


def _spec(name, shape, dtype):
    from keras_tandem.serving.specs import ArraySpec

    return ArraySpec(name, shape, np.dtype(dtype))


def test_integer_inputs_stay_inside_what_their_layers_accept():
    ids = keras.Input((5,), dtype="int32", name="ids")
    codes = keras.Input((2,), dtype="int64", name="codes")
    pixels = keras.Input((4,), dtype="uint8", name="pixels")
    x = keras.layers.Flatten()(keras.layers.Embedding(7, 2)(ids))
    y = keras.layers.IntegerLookup(vocabulary=[100, 200, 300], output_mode="one_hot")(codes)
    model = keras.Model([ids, codes, pixels], [x, y, keras.layers.Rescaling(1 / 255)(pixels)])
    specs = [_spec("ids", (5,), "int32"), _spec("codes", (2,), "int64"),
             _spec("pixels", (4,), "uint8")]
    maker = InputMaker(model, specs)
    got_ids, got_codes, got_pixels = maker.batch(400)
    assert got_ids.dtype == np.int32 and got_ids.min() >= 0 and got_ids.max() == 6
    assert set(np.unique(got_codes)) == {100, 200, 300}
    assert got_pixels.dtype == np.uint8 and got_pixels.max() > 200
    assert maker.structure == "list"


class _Bag(keras.Model):
    """A subclassed model: no graph to follow, so every layer is considered."""

    def __init__(self):
        super().__init__()
        self.embed = keras.layers.Embedding(5, 2)

    def call(self, ids):
        return keras.ops.mean(self.embed(ids), axis=1)


def test_inputs_of_nested_and_subclassed_models_stay_inside_their_embeddings():
    inner_ids = keras.Input((3,), dtype="int32")
    inner = keras.Model(inner_ids, keras.layers.Embedding(4, 2)(inner_ids))
    outer_ids = keras.Input((3,), dtype="int32")
    nested = keras.Model(outer_ids, inner(outer_ids))
    assert (domain_of(nested, 0, np.dtype("int32")).high) == 4
    bag = _Bag()
    bag(np.zeros((1, 3), "int32"))
    assert domain_of(bag, 0, np.dtype("int32")).high == 5


def test_string_inputs_come_from_the_models_vocabulary():
    words = ["red", "green", "blue"]
    text = keras.Input((), dtype="string")
    vectorize = keras.layers.TextVectorization(max_tokens=10, output_sequence_length=3)
    vectorize.adapt(np.array(["alpha beta", "gamma"]))
    tokens = keras.Input((2,), dtype="string")
    model = keras.Model([text, tokens],
                        [vectorize(text), keras.layers.StringLookup(vocabulary=words)(tokens)])
    maker = InputMaker(model, [_spec("text", (), object), _spec("tokens", (2,), object)])
    sentences, picked = maker.batch(50)
    assert sentences.shape == (50,) and picked.shape == (50, 2)
    assert {w for s in sentences for w in s.split()} <= {"alpha", "beta", "gamma"}
    assert set(picked.ravel()) == set(words)


def test_without_a_vocabulary_strings_are_short_words_and_ints_small():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    assert domain_of(model, 0, np.dtype(object)).kind == "token"
    small = domain_of(model, 0, np.dtype("int32"))
    assert (small.low, small.high) == (0, 10)
    assert domain_of(model, 0, np.dtype("float32")).kind == "float"


def test_compare_outputs_reports_the_largest_difference():
    want = {"a": np.array([[1.0, -2.0]], "float32"), "b": np.array([[b"cat"]], object)}
    close = {"a": want["a"] * (1 + 1e-6), "b": np.array([["cat"]])}
    assert compare_outputs(close, want, rtol=1e-4)["ok"]
    off = compare_outputs({"a": want["a"] + [[0.0, 0.1]], "b": want["b"]}, want, rtol=1e-4)
    assert not off["ok"] and off["max_abs_diff"] == pytest.approx(0.1, rel=1e-5)
    assert "output a: 1 of 2 values differ" in off["message"]
    assert "the largest at [0, 1]" in off["message"]
    words = compare_outputs({"a": want["a"], "b": np.array([["dog"]])}, want, rtol=1e-4)
    assert not words["ok"] and "strings differ" in words["message"]
    assert not compare_outputs(want["a"][0], want["a"], rtol=1e-4)["ok"]  # shapes differ


# ------------------------------------------------------------------- the zoo

# Kinds whose check also times the three techniques (strings, several inputs, a
# dict of outputs); the others check the answers only, to keep the suite fast.
TIMED = {"text_vectorization", "string_lookup", "multi_input", "dict_outputs"}


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_tandem_check_passes_on_a_saved_copy_of_every_zoo_model(kind, tmp_path):
    zoo = ZOO[kind]()
    if zoo.input_signature is not None:  # never called: a saved copy must be built
        zoo.model(zoo.make_inputs(1))
    path = tmp_path / f"{kind}.keras"
    zoo.model.save(path)
    speed = ["--seconds", "0.02", "--threads", "2"] if kind in TIMED else ["--no-speed"]
    code, report = _check(tmp_path, path, "--max-batch-size", "32", *speed)
    assert code == 0, report["reason"]
    assert report["rtol"] == (1e-2 if kind == "mixed_float16" else 1e-4)
    assert all(c["ok"] for c in report["answers"]) and len(report["answers"]) == 3
    assert len(report["speed"]) == (3 if kind in TIMED else 0)
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in report["speed"])
