"""TF Serving's own REST cases, replayed against `serve()`.

The cases come from TensorFlow Serving's `tensorflow_model_server_test.py`
(`test*REST`) and `http_rest_api_handler_test.cc` (Predict, Regress,
Classify, GetStatus, GetModelMetadata, request errors), and from its REST
API guide (JSON conformance: NaN / Infinity). They run against TF
Serving's own test SavedModels (`tests/data/tf_serving/`), and the predict
cases also against the same function (y = 0.5 x + 2) as a Keras model
saved as `.keras` and exported with `model.export()`.

One documented difference: TF Serving's batching is off by default, so it
feeds `{"instances": [[1.0, 2.0], [3.0, 4.0]]}` to an `x` declared
`[-1, 1]` as a `[2, 2]` tensor; here requests are batched together, which
needs the declared per-example shape, so such a request is refused with a
message naming it (leaving out the trailing size-1 dimension, as in
`{"instances": [1.0, 2.0]}`, is accepted, and the answer leaves it out too).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _http import request
from keras_tandem import serve

DATA = Path(__file__).parent / "data" / "tf_serving"
HALF_PLUS_TWO = DATA / "saved_model_half_plus_two_cpu"
HALF_PLUS_THREE = DATA / "saved_model_half_plus_three"
TWO_VERSIONS = DATA / "saved_model_half_plus_two_2_versions"
OK_STATUS = {"error_code": "OK", "error_message": ""}


def _keras_half_plus_two():
    import keras

    inp = keras.Input((1,), name="x")
    dense = keras.layers.Dense(1, name="y")
    model = keras.Model(inp, dense(inp))
    dense.set_weights([np.array([[0.5]], np.float32), np.array([2.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """`name -> ServerHandle`: TF Serving's models, and half_plus_two as .keras / export()."""
    root = tmp_path_factory.mktemp("tf_serving_rest")
    model = _keras_half_plus_two()
    (root / "keras" / "123").mkdir(parents=True)
    model.save(root / "keras" / "123" / "model.keras")
    model.export(str(root / "exported" / "00000123"), verbose=False)
    shutil.copytree(TWO_VERSIONS, root / "two_versions")
    bases = {"default": HALF_PLUS_TWO, "half_plus_three": HALF_PLUS_THREE,
             "saved_model_half_plus_two_2_versions": root / "two_versions",
             "keras": root / "keras", "exported": root / "exported"}
    handles = {}
    try:
        for name, base in bases.items():
            handles[name] = serve(base, name=name, port=0, poll_interval_s=3600,
                                  predictor_options={"max_batch_size": 8})
            handles[name].__enter__()
        yield handles
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def call(servers, model, method, path="", body=None, raw=False):
    port = servers[model].port
    return request(port, method, f"/v1/models/{model}{path}", body, raw=raw)


PREDICT_MODELS = ["default", "keras", "exported"]


# ------------------------------------------------ tensorflow_model_server_test.py


@pytest.mark.parametrize("model", PREDICT_MODELS)
def test_predict_rest(servers, model):
    status, _, doc = call(servers, model, "POST", ":predict", {"instances": [2.0, 3.0, 4.0]})
    assert (status, doc) == (200, {"predictions": [3.0, 3.5, 4.0]})


@pytest.mark.parametrize("model", PREDICT_MODELS)
def test_predict_columnar_rest(servers, model):
    status, _, doc = call(servers, model, "POST", ":predict", {"inputs": [2.0, 3.0, 4.0]})
    assert (status, doc) == (200, {"outputs": [3.0, 3.5, 4.0]})


def test_classify_rest(servers):
    status, _, doc = call(servers, "default", "POST", ":classify",
                          {"signature_name": "classify_x_to_y", "examples": [{"x": 2.0}]})
    assert (status, doc) == (200, {"results": [[["", 3.0]]]})


def test_regress_rest(servers):
    status, _, doc = call(servers, "default", "POST", ":regress",
                          {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]})
    assert (status, doc) == (200, {"results": [3.0]})


@pytest.mark.parametrize("model", PREDICT_MODELS)
def test_get_status_rest(servers, model):
    status, _, doc = call(servers, model, "GET")
    assert (status, doc) == (200, {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": OK_STATUS}]})


def test_get_model_metadata_rest(servers):
    status, _, doc = call(servers, "default", "GET", "/metadata")
    want = json.loads((DATA / "half_plus_two_model_metadata.json").read_text())
    assert status == 200
    assert doc == want


def test_half_plus_three_predict_and_regress(servers):
    # testGoodModelConfig: half_plus_three answers 4.0 for x = 2.0
    status, _, doc = call(servers, "half_plus_three", "POST", ":predict", {"instances": [2.0]})
    assert (status, doc) == (200, {"predictions": [4.0]})
    status, _, doc = call(servers, "half_plus_three", "POST", ":regress",
                          {"signature_name": "tensorflow/serving/regress",
                           "examples": [{"x": 2.0}, {"x": 4.0}]})
    assert (status, doc) == (200, {"results": [4.0, 5.0]})


# ------------------------------------------------ http_rest_api_handler_test.cc

V2 = "saved_model_half_plus_two_2_versions"


def test_handler_predict(servers):
    status, headers, doc = call(servers, V2, "POST", ":predict",
                                {"instances": [[1.0], [3.0]]})
    assert (status, doc) == (200, {"predictions": [[2.5], [3.5]]})
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Model-Version"] == "124"  # the newest of 00000123 and 00000124
    for body, key in (({"instances": [1.0, 2.0]}, "predictions"),
                      ({"signature_name": "serving_default", "instances": [3.0, 4.0]},
                       "predictions"),
                      ({"signature_name": "serving_default", "inputs": [3.0, 4.0]}, "outputs")):
        status, _, doc = call(servers, V2, "POST", "/versions/124:predict", body)
        want = [2.5, 3.0] if body.get("instances") == [1.0, 2.0] else [3.5, 4.0]
        assert (status, doc) == (200, {key: want}), body


def test_handler_predict_of_another_per_example_shape_is_refused_clearly(servers):
    # TF Serving (unbatched) answers [[2.5, 3.0], [3.5, 4.0]]; see the module docstring
    status, _, doc = call(servers, V2, "POST", ":predict",
                          {"instances": [[1.0, 2.0], [3.0, 4.0]]})
    assert status == 400
    assert "(1,)" in doc["error"]


def test_handler_regress_and_classify(servers):
    status, headers, doc = call(servers, V2, "POST", ":regress",
                                {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]})
    assert (status, doc) == (200, {"results": [42.0]})
    assert headers["Content-Type"] == "application/json"
    status, _, doc = call(servers, V2, "POST", "/versions/124:regress",
                          {"signature_name": "regress_x_to_y", "examples": [{"x": 80.0}]})
    assert (status, doc) == (200, {"results": [42.0]})
    status, _, doc = call(servers, V2, "POST", ":classify",
                          {"signature_name": "classify_x_to_y", "examples": [{"x": 20.0}]})
    assert (status, doc) == (200, {"results": [[["", 12.0]]]})


def test_handler_get_status_of_a_version(servers):
    status, _, doc = call(servers, V2, "GET", "/versions/124")
    assert (status, doc) == (200, {"model_version_status": [
        {"version": "124", "state": "AVAILABLE", "status": OK_STATUS}]})


def test_handler_get_model_metadata(servers):
    status, _, doc = call(servers, V2, "GET", "/metadata")
    want = json.loads((DATA / "saved_model_half_plus_two_2_versions_metadata.json").read_text())
    assert status == 200
    assert doc["metadata"] == want["metadata"]
    assert doc["model_spec"]["name"] == V2 and doc["model_spec"]["version"] == "124"


@pytest.mark.parametrize("path", ["/v1/models/foo:predict", "/v1/models/foo/versions/50:predict",
                                  f"/v1/models/{V2}/versions/99:predict"])
def test_handler_unknown_model_or_version_is_not_found(servers, path):
    status, _, doc = request(servers[V2].port, "POST", path, {"instances": [1.0]})
    assert status == 404, doc


@pytest.mark.parametrize("body, message", [
    (b"", "JSON"),
    (b"instances = [1, 2]", "JSON"),
    ({"instances": ["x", "y"]}, "float"),
    ({"signature_name": 100}, "'signature_name' key must be a string value"),
])
def test_handler_predict_request_errors(servers, body, message):
    status, _, doc = call(servers, V2, "POST", ":predict", body)
    assert status == 400
    assert message in doc["error"]


def test_classify_with_a_predict_signature_is_refused_with_tf_servings_words(servers):
    status, _, doc = call(servers, "default", "POST", ":classify", {"examples": [{"x": 1.0}]})
    assert status == 400
    assert ("Expected classification signature method_name to be tensorflow/serving/classify. "
            "Was: tensorflow/serving/predict") in doc["error"]
    status, _, doc = call(servers, "exported", "POST", ":regress", {"examples": [{"x": 1.0}]})
    assert status == 400 and "Expected regression signature method_name" in doc["error"]


def test_classify_without_examples_is_refused(servers):
    status, _, doc = call(servers, "default", "POST", ":classify",
                          {"signature_name": "classify_x_to_y"})
    assert status == 400 and "'examples'" in doc["error"]


# ------------------------------------------------ REST API guide: JSON conformance


@pytest.mark.parametrize("model", PREDICT_MODELS)
def test_nan_and_infinity_round_trip(servers, model):
    status, _, body = call(servers, model, "POST", ":predict",
                           b'{"instances": [NaN, Infinity, -Infinity, 1e39]}', raw=True)
    assert status == 200
    assert body.replace(b" ", b"").replace(b"\n", b"") == (
        b'{"predictions":[NaN,Infinity,-Infinity,Infinity]}')


def test_classify_results_carry_nan_as_a_token(servers):
    status, _, body = request(servers["default"].port, "POST", "/v1/models/default:regress",
                              b'{"signature_name": "regress_x_to_y", "examples": [{"x": NaN}]}',
                              raw=True)
    assert status == 200
    assert body.replace(b" ", b"") == b'{"results":[NaN]}'
