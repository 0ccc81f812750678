"""TF Serving's REST JSON formats (`server/_protocol.py`) without a server or a model.

Request bodies go in as bytes and come out as what `Predictor.submit` takes,
or as an `InvalidInputError` that says what is wrong; answers go in as arrays
and come out as the JSON documents TF Serving's REST API defines
(https://www.tensorflow.org/tfx/serving/api_rest).
"""

import json

import numpy as np
import orjson
import pytest

from keras_tandem.errors import InvalidInputError
from keras_tandem.server._protocol import (
    COLUMNAR,
    ROW,
    OutputSpec,
    dumps,
    error_body,
    format_predictions,
    metadata_doc,
    parse_predict_body,
    version_status,
)
from keras_tandem.serving.specs import ArraySpec


def spec(name, shape, dtype="float32"):
    return ArraySpec(name, tuple(shape), np.dtype(dtype))


ONE = [spec("x", (4,))]  # one input of 4 floats
TWO = [spec("a", (3,)), spec("ids", (2,), "int32")]  # two named inputs


def parse(doc, fields=ONE):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_predict_body(body, fields)


def decoded(body: bytes):
    return json.loads(body)


# ------------------------------------------------------------------ requests


def test_row_format_of_one_input_is_a_batch_array_cast_like_the_predictor_casts():
    x, fmt = parse({"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    assert fmt == ROW
    assert isinstance(x, np.ndarray) and x.dtype == np.float32  # JSON integers into floats
    np.testing.assert_array_equal(x, [[1, 2, 3, 4], [5, 6, 7, 8]])
    x, _ = parse({"instances": [[0.5] * 4]})
    assert x.shape == (1, 4)  # one instance is still a batch of one


def test_row_format_with_named_inputs_gives_one_batch_per_input():
    x, fmt = parse({"instances": [{"a": [1.0, 2.0, 3.0], "ids": [1, 2]},
                                  {"a": [4.0, 5.0, 6.0], "ids": [3, 4]}]}, TWO)
    assert fmt == ROW and set(x) == {"a", "ids"}
    assert x["a"].dtype == np.float32 and x["a"].shape == (2, 3)
    assert x["ids"].dtype == np.int32
    np.testing.assert_array_equal(x["ids"], [[1, 2], [3, 4]])
    # A single input may be named too.
    x, _ = parse({"instances": [{"x": [1, 2, 3, 4]}]})
    np.testing.assert_array_equal(x["x"], [[1, 2, 3, 4]])


def test_row_format_leaves_what_it_cannot_cast_to_the_predictor():
    # Floats into an integer input, and names the model does not have, are
    # the Predictor's to refuse: it names the input and what it expects.
    x, _ = parse({"instances": [{"a": [1.0, 2.0, 3.0], "ids": [1.5, 2.0], "zz": [0]}]}, TWO)
    assert x["ids"].dtype == np.float64
    np.testing.assert_array_equal(x["zz"], [[0]])
    x, _ = parse({"instances": [[0.0] * 5]})  # a wrong example shape, likewise
    assert x.shape == (1, 5)


def test_columnar_format_takes_a_tensor_a_dict_or_a_list():
    x, fmt = parse({"inputs": [[1.0, 2.0, 3.0, 4.0]]})
    assert fmt == COLUMNAR
    np.testing.assert_array_equal(x, [[1, 2, 3, 4]])
    x, _ = parse({"inputs": [1.0, 2.0, 3.0, 4.0]})  # one example, no batch axis
    assert x.shape == (4,)
    x, fmt = parse({"inputs": {"a": [[1.0, 2.0, 3.0]], "ids": [[7, 8]]}}, TWO)
    assert fmt == COLUMNAR
    np.testing.assert_array_equal(x["a"], [[1, 2, 3]])
    np.testing.assert_array_equal(x["ids"], [[7, 8]])
    x, _ = parse({"inputs": [[[1.0, 2.0, 3.0]], [[7, 8]]]}, TWO)  # in the model's order
    assert len(x) == 2
    np.testing.assert_array_equal(np.asarray(x[1]), [[7, 8]])


@pytest.mark.parametrize("name", ["serving_default", ""])
def test_the_default_signature_may_be_named(name):
    x, _ = parse({"instances": [[0.0] * 4], "signature_name": name})
    assert x.shape == (1, 4)


@pytest.mark.parametrize(("doc", "fields", "fragments"), [
    (b"{not json", ONE, ["Malformed JSON"]),
    (b"[[1, 2, 3, 4]]", ONE, ["JSON object", "list"]),
    ({"instances": [[0.0] * 4], "inputs": [[0.0] * 4]}, ONE, ["both", "exactly one"]),
    ({"examples": [[0.0] * 4]}, ONE, ["neither", "examples"]),
    ({"instances": [[0.0] * 4], "signature_name": "predict2"}, ONE,
     ["'predict2'", "serving_default"]),
    ({"instances": []}, ONE, ["non-empty", "an empty list"]),
    ({"instances": {"x": [0.0] * 4}}, ONE, ["non-empty JSON list", "dict"]),
    ({"instances": [0.0, 1.0, 2.0, 3.0]}, ONE, ["list of examples", "(4,)", "a scalar"]),
    ({"instances": [[[0.0] * 4]]}, ONE, ["(4,)", "shape (1, 4)", "'x'", "(n, 4)"]),
    ({"instances": [[0.0] * 4, [0.0] * 3]}, ONE, ["rectangular", "ragged"]),
    ({"instances": [[1.0, 2.0, 3.0]]}, TWO, ["2 named inputs", "['a', 'ids']", '{"a"']),
    ({"instances": [{"a": [1.0] * 3, "ids": [1, 2]}, {"a": [1.0] * 3}]}, TWO,
     ["instance 1", "same inputs"]),
    ({"instances": [{"a": [1.0] * 3, "ids": [1, 2]}, [1.0] * 3]}, TWO, ["instance 1"]),
    ({"inputs": None}, ONE, ['"inputs" is null']),
    ({"inputs": [[0.0] * 4, [0.0]]}, ONE, ["rectangular"]),
])
def test_a_bad_body_raises_invalid_input_saying_what_is_wrong(doc, fields, fragments):
    with pytest.raises(InvalidInputError) as info:
        parse(doc, fields)
    assert isinstance(info.value, ValueError)  # a 400, not a server error
    for fragment in fragments:
        assert fragment in str(info.value)


# ----------------------------------------------------------------- responses


def test_one_output_gives_predictions_by_row_and_outputs_by_column():
    spec_ = OutputSpec("single", ("dense",), ((2,),), (np.dtype("float32"),))
    y = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    assert decoded(format_predictions(y, spec_, ROW)) == {"predictions": [[0.5, -1.0],
                                                                          [2.0, 0.25]]}
    assert decoded(format_predictions(y, spec_, COLUMNAR)) == {"outputs": [[0.5, -1.0],
                                                                           [2.0, 0.25]]}
    # One example answered in columnar format: no batch axis.
    assert decoded(format_predictions(y[0], spec_, COLUMNAR)) == {"outputs": [0.5, -1.0]}


def test_several_outputs_give_one_object_per_row_or_one_entry_per_output():
    spec_ = OutputSpec("dict", ("score", "probs"), ((1,), (3,)),
                       (np.dtype("float32"), np.dtype("float32")))
    y = {"probs": np.array([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]], np.float32),
         "score": np.array([[1.5], [-2.0]], np.float32)}
    assert decoded(format_predictions(y, spec_, ROW)) == {"predictions": [
        {"score": [1.5], "probs": [0.25, 0.25, 0.5]},
        {"score": [-2.0], "probs": [1.0, 0.0, 0.0]},
    ]}
    assert decoded(format_predictions(y, spec_, COLUMNAR)) == {"outputs": {
        "score": [[1.5], [-2.0]], "probs": [[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]]}}
    listed = OutputSpec("list", ("output_0", "output_1"), ((1,), (2,)),
                        (np.dtype("float32"), np.dtype("int32")))
    y = [np.array([[1.0]], np.float32), np.array([[3, 4]], np.int32)]
    assert decoded(format_predictions(y, listed, ROW)) == {"predictions": [
        {"output_0": [1.0], "output_1": [3, 4]}]}
    assert decoded(format_predictions(y, listed, COLUMNAR)) == {"outputs": {
        "output_0": [[1.0]], "output_1": [[3, 4]]}}


def test_floats_are_written_in_their_own_precision():
    y = np.array([[0.1]], np.float32)
    spec_ = OutputSpec("single", ("y",), ((1,),), (np.dtype("float32"),))
    body = format_predictions(y, spec_, ROW)
    assert b"0.1]" in body and b"0.10000000149" not in body  # not widened to float64
    assert decoded(dumps({"v": np.array([0.1], np.float64)}))["v"] == [0.1]


def test_dumps_takes_what_orjson_refuses():
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # not contiguous
    assert decoded(dumps({"y": strided})) == {"y": [[0, 2], [4, 6], [8, 10]]}
    assert decoded(dumps({"y": np.array([1, 2], np.float16)})) == {"y": [1.0, 2.0]}


def test_error_body_is_an_object_with_the_message():
    message = 'Input \'x\' expects (4,) float32, got "(5,)"'
    body = error_body(message)
    assert orjson.loads(body) == {"error": message}


def test_version_status_follows_get_model_status():
    assert version_status(3, "AVAILABLE") == {
        "version": "3", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""}}
    failed = version_status(4, "END", "UNKNOWN", "ValueError: not a model")
    assert failed["status"] == {"error_code": "UNKNOWN", "error_message": "ValueError: not a model"}


def test_metadata_document_describes_the_serving_default_signature():
    inputs = [spec("a", (3,)), spec("ids", (2, 5), "int64"), spec("mask", (), "bool")]
    outputs = OutputSpec("dict", ("score", "probs"), ((1,), (3,)),
                         (np.dtype("float32"), np.dtype("float64")))
    doc = json.loads(dumps(metadata_doc("clf", 7, inputs, outputs)))
    assert doc["model_spec"] == {"name": "clf", "signature_name": "", "version": "7"}
    signature = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"

    def described(info):
        return (info["name"], info["dtype"], [d["size"] for d in info["tensor_shape"]["dim"]],
                info["tensor_shape"]["unknown_rank"])

    assert [described(signature["inputs"][k]) for k in ("a", "ids", "mask")] == [
        ("a", "DT_FLOAT", ["-1", "3"], False),
        ("ids", "DT_INT64", ["-1", "2", "5"], False),
        ("mask", "DT_BOOL", ["-1"], False),
    ]
    assert described(signature["outputs"]["score"]) == ("score", "DT_FLOAT", ["-1", "1"], False)
    assert described(signature["outputs"]["probs"]) == ("probs", "DT_DOUBLE", ["-1", "3"], False)
