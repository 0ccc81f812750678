"""TF Serving's REST JSON formats (`server/_protocol.py`) without a server or a model.

Request bodies go in as bytes and come out as what `Predictor.submit` takes,
or as an `InvalidInputError` that says what is wrong; answers go in as arrays
and come out as the JSON documents TF Serving's REST API defines
(https://www.tensorflow.org/tfx/serving/api_rest).
"""

import json
import warnings

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
    json_safe,
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


# --------------------------------------------- large bodies, NaN and Infinity


LARGE_CASES = [
    {"instances": [[0.5, 1, 2, 3]] * 40},
    {"instances": [[0.5, -1e39, 2, 1e39]] * 40},
    {"inputs": [[0.5, 1, 2, 3]] * 40},
    {"inputs": [0.5, 1, 2, 3]},
    {"instances": [[0.5] * 5] * 40},  # wrong shape: the usual message
    {"instances": [[0.5] * 4] * 40 + [[1.0] * 3]},  # ragged
    {"instances": [0.5, 1, 2, 3] * 10},  # scalars, not examples
    {"instances": [[0.5] * 4] * 40, "signature_name": "other"},
    {"instances": [[0.5] * 4] * 40, "inputs": [[1] * 4]},
    {"instances": [], "x": 1},
    {"instances": [[True] * 4] * 40},
    {"instances": [["a"] * 4] * 40},
    {"signature_name": "", "instances": [[1, 2, 3, 4]] * 40, "z": {"instances": [1]}},
]


@pytest.mark.parametrize("doc", [
    *LARGE_CASES,
    b'{"instances": [[NaN, Infinity, -Infinity, 1]] }',
    b'{"instances": [[1,2,3,4],[1,2,3,4]] , "x": [1',
    b'{"instances":[[1,2,3,4],[1,2,3,4]]}x',
    b'{"instances":[[1,2,3,4],[1,2,3,.4]]}',
    b'{"instances":[[1,2,3,4],[1,2,3,4]' + b' ' * 100,
])
def test_large_bodies_decoded_in_pieces_give_what_the_whole_body_gives(doc):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    def outcome(data, chunk_bytes):
        try:
            x, fmt = parse_predict_body(data, ONE, chunk_bytes=chunk_bytes)
        except InvalidInputError as e:
            return "error", str(e)
        return fmt, x

    whole = outcome(body, 10**9)
    for data in (body, bytearray(body)):
        pieces = outcome(data, 16)  # many pieces, cut at many places
        assert pieces[0] == whole[0]
        if whole[0] == "error":
            assert pieces[1] == whole[1]
        else:
            assert pieces[1].dtype == whole[1].dtype
            np.testing.assert_array_equal(pieces[1], whole[1])
    assert bytes(data) == body  # the bytearray was given back as it came


@pytest.mark.parametrize("doc", [LARGE_CASES[0], LARGE_CASES[1], LARGE_CASES[2],
                                 {"instances": [[[1, 2], [3, 4]]] * 30}])
def test_a_large_numeric_body_never_goes_through_the_whole_body_decoder(doc, monkeypatch):
    import keras_tandem.server._protocol as protocol

    def refuse(body):
        raise AssertionError("decoded whole")

    monkeypatch.setattr(protocol, "_loads", refuse)
    fields = ONE if "[[[" not in json.dumps(doc) else [spec("x", (2, 2))]
    x, _ = parse_predict_body(json.dumps(doc).encode(), fields, chunk_bytes=16)
    with np.errstate(over="ignore"):  # 1e39 into float32: Infinity, as the server does
        expected = np.asarray(next(iter(doc.values())), np.float32)
    np.testing.assert_array_equal(x, expected)


def test_values_too_large_for_the_input_dtype_become_infinity_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for chunk_bytes in (16, 10**9):
            x, _ = parse_predict_body(b'{"instances": [[1e39, -1e39, 1e400, NaN]]}', ONE,
                                      chunk_bytes=chunk_bytes)
            assert x.dtype == np.float32
            assert x[0, :3].tolist() == [np.inf, -np.inf, np.inf] and np.isnan(x[0, 3])


def test_non_finite_answers_are_written_as_tf_serving_writes_them():
    out = np.array([[np.nan, np.inf], [-np.inf, 0.1]], np.float32)
    assert format_predictions(out, OutputSpec("single", ("y",), ((2,),),
                                              (np.dtype("float32"),)), ROW) == \
        b'{"predictions":[[NaN,Infinity],[-Infinity,0.1]]}'
    two = OutputSpec("dict", ("a", "b"), ((1,), (1,)), (np.dtype("float32"),) * 2)
    body = format_predictions({"a": np.array([[np.nan]], np.float32),
                               "b": np.array([[1.5]], np.float32)}, two, COLUMNAR)
    assert body == b'{"outputs":{"a":[[NaN]],"b":[[1.5]]}}'
    assert json_safe(np.array([0.1], np.float32)).dtype == np.float32  # finite: untouched


def _bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.array([[1.5, -2.0]], ml_dtypes.bfloat16)


@pytest.mark.parametrize("make", [
    lambda: np.array([[0.1, -2.5]], np.float32),
    lambda: np.array([[0.1, np.nan], [np.inf, -np.inf]], np.float32),
    lambda: np.array([[1e-3, 2.0]], np.float16),
    lambda: np.array([[np.nan, 2.0]], np.float64),
    lambda: np.array([[1, -2]], np.int64),
    lambda: np.array([[True, False]]),
    lambda: np.arange(8, dtype=np.float32).reshape(2, 4)[:, ::2],  # a strided view
    lambda: np.zeros((0, 2), np.float32),
    _bfloat16,
], ids=["f32", "f32-nonfinite", "f16", "f64-nan", "int", "bool", "strided", "empty", "bf16"])
@pytest.mark.parametrize("fmt", [ROW, COLUMNAR])
def test_a_single_numeric_answer_is_written_as_the_general_encoder_writes_it(make, fmt):
    out = make()
    spec_ = OutputSpec("single", ("y",), (out.shape[1:],), (out.dtype,))
    key = "predictions" if fmt == ROW else "outputs"
    assert format_predictions(out, spec_, fmt) == dumps({key: json_safe(out)})


# ------------------------------------------------- binary strings ({"b64": ...})

TEXT = [spec("text", (), object)]
BYTES_IN = [spec("image_bytes", (), object), spec("k", (), "int32")]


def b64(data):
    import base64

    return {"b64": base64.b64encode(data).decode("ascii")}


def test_b64_objects_decode_to_the_exact_bytes_in_row_and_columnar_formats():
    raw = [b"\x89PNG\x00", b"ab\x00\x00", b""]  # trailing NULs must survive
    for doc in ({"instances": [b64(r) for r in raw]}, {"inputs": [b64(r) for r in raw]}):
        x, _ = parse_predict_body(json.dumps(doc).encode(), TEXT)
        assert x.dtype == object and list(x) == raw


def test_b64_objects_decode_in_named_inputs_of_both_formats():
    rows = {"instances": [{"image_bytes": b64(b"\x00\xff"), "k": 1},
                          {"image_bytes": b64(b"xy"), "k": 2}]}
    cols = {"inputs": {"image_bytes": [b64(b"\x00\xff"), b64(b"xy")], "k": [1, 2]}}
    for doc in (rows, cols):
        x, _ = parse_predict_body(json.dumps(doc).encode(), BYTES_IN)
        assert list(x["image_bytes"]) == [b"\x00\xff", b"xy"]
        assert list(x["k"]) == [1, 2]


def test_a_b64_that_does_not_decode_is_invalid_input():
    with pytest.raises(InvalidInputError, match="base64"):
        parse_predict_body(b'{"instances": [{"b64": "not base64!"}]}', TEXT)
    with pytest.raises(InvalidInputError, match="b64"):
        parse_predict_body(b'{"instances": [{"b64": 12}]}', TEXT)


def test_string_outputs_named_bytes_are_written_as_b64_others_as_text():
    outputs = {"image_bytes": np.array([b"\x00\x01", b"ok"], object),
               "label": np.array([b"cat", b"\xff"], object)}
    out = OutputSpec.from_specs({k: v[0] for k, v in outputs.items()},
                                [spec("image_bytes", (), object), spec("label", (), object)])
    doc = json.loads(format_predictions(outputs, out, ROW))
    assert doc["predictions"] == [
        {"image_bytes": {"b64": "AAE="}, "label": "cat"},
        {"image_bytes": {"b64": "b2s="}, "label": {"b64": "/w=="}},
    ]
    single = OutputSpec.from_specs(np.array(b"x", object), [spec("out_bytes", (), object)])
    doc = json.loads(format_predictions(np.array([b"hi"], object), single, COLUMNAR))
    assert doc == {"outputs": [{"b64": "aGk="}]}
