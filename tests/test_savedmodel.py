"""SavedModel versions served through the batching Predictor (`server/_savedmodel.py`).

A module-scoped base directory holds version 1, written by Keras 3's
`model.export()`, and version `00000002`, written by `tf.saved_model.save`
with a second, named signature. Tests serve it in-process with `serve()`,
drive a `VersionWatcher` one poll at a time, and run `tandem serve` once.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from _http import cli_serve, request
from keras_tandem import serve
from keras_tandem.server import load_keras_model, locate_model
from keras_tandem.server._repository import (
    AVAILABLE,
    ServedModel,
    VersionWatcher,
    servable_from_saved_model,
)

OPTIONS = {"max_batch_size": 8}
X = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
A = np.arange(8, dtype=np.float32).reshape(4, 2)
W = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


class TwoSignatures(tf.Module):
    """`serving_default` takes a matrix and integer ids; `double` takes the matrix only."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(W)

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a"),
                                  tf.TensorSpec([None], tf.int32, name="ids")])
    def default(self, a, ids):
        return {"y": tf.matmul(a, self.w), "twice_ids": ids * 2}

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a")])
    def double(self, a):
        return {"doubled": a * 2.0}


class Unbatched(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([2], tf.float32, name="v")])
    def f(self, v):
        return {"out": v + 1.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """`BASE/1` from `model.export()`, `BASE/00000002` with two signatures; and v1's model."""
    root = tmp_path_factory.mktemp("savedmodels")
    keras.utils.set_random_seed(3)
    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Dense(5, activation="relu")(inp)))
    model.export(str(root / "1"), verbose=False)
    module = TwoSignatures()
    tf.saved_model.save(module, str(root / "00000002"),
                        signatures={"serving_default": module.default, "double": module.double})
    return root, keras.ops.convert_to_numpy(model(X, training=False))


@pytest.fixture(scope="module")
def served_base(base):
    root, _ = base
    with serve(root, name="sm", port=0, poll_interval_s=3600) as server:
        yield server


def predict(server, body, path="/v1/models/sm:predict"):
    return request(server.port, "POST", path, body)


def test_the_newest_version_by_number_serves_its_default_signature(served_base):
    status, headers, doc = predict(
        served_base, {"inputs": {"a": A.tolist(), "ids": [1, 2, 3, 4]}})
    assert status == 200, doc
    assert headers["X-Model-Version"] == "2"
    np.testing.assert_allclose(doc["outputs"]["y"], A @ W, rtol=1e-6)
    assert doc["outputs"]["twice_ids"] == [2, 4, 6, 8]
    status, _, doc = request(served_base.port, "GET", "/v1/models/sm/versions/2")
    assert status == 200 and doc["model_version_status"][0]["state"] == AVAILABLE


def test_signature_name_chooses_the_signature(served_base):
    status, headers, doc = predict(
        served_base, {"signature_name": "double", "instances": A.tolist()})
    assert status == 200, doc
    assert headers["X-Model-Version"] == "2"
    np.testing.assert_allclose(doc["predictions"], A * 2.0)
    # the default signature is named as TF Serving clients name it, or not at all
    status, _, doc = predict(served_base, {"signature_name": "serving_default",
                                           "instances": [{"a": [1.0, 0.0], "ids": 5}]})
    assert status == 200, doc
    assert doc["predictions"] == [{"y": [1.0, 2.0], "twice_ids": 10}]


def test_an_unknown_signature_name_is_refused_with_the_names_there_are(served_base):
    status, _, doc = predict(served_base, {"signature_name": "triple", "instances": A.tolist()})
    assert status == 400
    assert "triple" in doc["error"] and "'double'" in doc["error"]
    assert "'serving_default'" in doc["error"]


def test_metadata_is_the_savedmodels_own_signature_def(served_base):
    status, _, doc = request(served_base.port, "GET", "/v1/models/sm/metadata")
    assert status == 200
    assert doc["model_spec"] == {"name": "sm", "signature_name": "", "version": "2"}
    sigs = doc["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "double"} <= set(sigs)
    default = sigs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    a = default["inputs"]["a"]
    assert a["dtype"] == "DT_FLOAT" and a["name"].endswith(":0")
    assert a["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}, {"size": "2", "name": ""}],
                                 "unknown_rank": False}
    assert default["inputs"]["ids"]["dtype"] == "DT_INT32"
    assert set(default["outputs"]) == {"y", "twice_ids"}
    assert sigs["double"]["inputs"]["a"]["name"] != a["name"]
    status, _, pinned = request(served_base.port, "GET", "/v1/models/sm/versions/2/metadata")
    assert status == 200 and pinned == doc


def test_requests_share_batches(served_base):
    import concurrent.futures

    body = {"signature_name": "double", "instances": A[:1].tolist()}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: predict(served_base, body), range(16)))
    assert all(s == 200 and d["predictions"] == [[0.0, 2.0]] for s, _, d in answers)


def test_a_single_savedmodel_directory_serves_as_version_1(base):
    root, want = base
    with serve(root / "1", name="one", port=0) as server:
        status, headers, doc = request(server.port, "POST", "/v1/models/one:predict",
                                       {"instances": X.tolist()})
        assert status == 200, doc
        assert headers["X-Model-Version"] == "1"
        np.testing.assert_allclose(doc["predictions"], want, rtol=1e-5, atol=1e-6)
        status, _, meta = request(server.port, "GET", "/v1/models/one/metadata")
        x = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]
        assert x["dtype"] == "DT_FLOAT" and x["name"].endswith("x:0")
        assert [d["size"] for d in x["tensor_shape"]["dim"]] == ["-1", "3"]


def test_locate_and_load_accept_savedmodels(base):
    root, want = base
    assert locate_model(root) == (root / "00000002", 2)
    assert locate_model(root / "1") == (root / "1", 1)
    model = load_keras_model(root / "1")
    got = model.predict({"x": X}, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_signature_without_a_batch_dimension_is_refused_clearly(tmp_path):
    module = Unbatched()
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.f})
    with pytest.raises(ValueError, match=r"'v'.*batch dimension"):
        servable_from_saved_model(tmp_path / "1", 1, OPTIONS)


def test_the_watcher_warns_once_of_a_directory_with_neither_format_and_swaps_in_a_savedmodel(
        base, tmp_path, caplog):
    import shutil

    root, want = base
    watched = tmp_path / "models"
    shutil.copytree(root / "1", watched / "1")
    (watched / "0003").mkdir()  # neither format
    served = ServedModel("w")
    watcher = VersionWatcher(served, watched, OPTIONS, poll_interval_s=3600)
    try:
        with caplog.at_level(logging.WARNING, logger="keras_tandem.server"):
            watcher.load_initial()
            watcher.poll_once()
            watcher.poll_once()
        warned = [r.getMessage() for r in caplog.records if "0003" in r.getMessage()]
        assert len(warned) == 1 and "neither" in warned[0] and "saved_model.pb" in warned[0]
        assert served.current.version == 1
        np.testing.assert_allclose(served.current.predictor.predict(X), want, rtol=1e-5,
                                   atol=1e-6)
        shutil.copytree(root / "00000002", watched / "00000004")
        watcher.poll_once()  # seen
        watcher.poll_once()  # unchanged since: loaded
        assert served.current.version == 4
        assert served.current.for_signature("double") is not None
        got = served.current.for_signature("double").predictor.predict({"a": A})
        np.testing.assert_allclose(got, A * 2.0)
        states = {e["version"]: e["state"] for e in served.status()}
        assert states == {"4": AVAILABLE, "1": "END"}
    finally:
        watcher.stop()
        if served.current is not None:
            served.current.close()


def test_tandem_serve_serves_a_base_of_savedmodels_and_warns_of_an_empty_version(
        base, tmp_path):
    import shutil

    root, _ = base
    cli_base = tmp_path / "base"
    shutil.copytree(root, cli_base)
    (cli_base / "7").mkdir()
    with cli_serve(cli_base, "--name", "sm") as cli:
        output = "".join(cli.lines)
        assert "neither" in output and str(cli_base / "7") in output, output
        status, headers, doc = request(cli.port, "POST", "/v1/models/sm:predict",
                                       {"signature_name": "double", "inputs": {"a": A.tolist()}})
        assert status == 200, (doc, output)
        assert headers["X-Model-Version"] == "2"
        np.testing.assert_allclose(doc["outputs"], A * 2.0)


def test_tandem_serve_names_a_numbered_savedmodel_directory_after_its_base(base):
    from keras_tandem.server.cli import default_name

    root, _ = base
    assert default_name(str(root / "1")) == root.name
    assert default_name(str(root)) == root.name
