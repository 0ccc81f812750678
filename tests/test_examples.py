"""TF Serving's classify / regress formats (`server/_examples.py`), without a server.

Requests become serialized `tf.train.Example` protos typed as TF Serving's
REST API types them; signatures are checked with TF Serving's messages;
outputs become `results` as TF Serving's REST and gRPC answers write them.
The signature_def used is that of TF Serving's own `half_plus_two` test model.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, regression_pb2

from keras_tandem.errors import InvalidInputError
from keras_tandem.server._examples import (
    classify_results,
    examples_from_input_proto,
    examples_from_json,
    fill_classification,
    fill_regression,
    prepare_examples,
    regress_results,
    results_json,
)
from keras_tandem.server._savedmodel import signature_def_doc

HALF_PLUS_TWO = Path(__file__).parent / "data" / "tf_serving" / "saved_model_half_plus_two_cpu"


@pytest.fixture(scope="module")
def sigs():
    return signature_def_doc(HALF_PLUS_TWO / "00000123")


def parse(serialized):
    example = example_pb2.Example()
    example.ParseFromString(serialized)
    return {name: (f.WhichOneof("kind"), list(getattr(f, f.WhichOneof("kind")).value)
                   if f.WhichOneof("kind") else [])
            for name, f in example.features.feature.items()}


def test_json_examples_are_typed_as_tf_serving_types_them():
    doc = {"examples": [{"f": 2.0, "i": 3, "b": True, "s": "héllo", "raw": {"b64": "AAH/"},
                         "fl": [1.0, 2.5], "il": [1, 2], "empty": []}]}
    (serialized,) = examples_from_json(doc)
    got = parse(serialized)
    assert got["f"] == ("float_list", [2.0])
    assert got["i"] == ("int64_list", [3])
    assert got["b"] == ("int64_list", [1])
    assert got["s"] == ("bytes_list", ["héllo".encode()])
    assert got["raw"] == ("bytes_list", [b"\x00\x01\xff"])
    assert got["fl"] == ("float_list", [1.0, 2.5])
    assert got["il"] == ("int64_list", [1, 2])
    assert got["empty"] == (None, [])


def test_nan_and_infinity_tokens_and_overflow_become_float_features():
    body = b'{"examples": [{"x": [NaN, Infinity, -Infinity, 1e300]}]}'
    (serialized,) = examples_from_json(body)
    kind, values = parse(serialized)["x"]
    assert kind == "float_list"
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf, math.inf]


def test_the_context_is_merged_into_each_example_and_an_examples_own_feature_wins():
    doc = {"context": {"country": "fr", "x": 1.0},
           "examples": [{"x": 2.0}, {"age": 7}]}
    first, second = (parse(s) for s in examples_from_json(doc))
    assert first == {"country": ("bytes_list", [b"fr"]), "x": ("float_list", [2.0])}
    assert second == {"country": ("bytes_list", [b"fr"]), "x": ("float_list", [1.0]),
                      "age": ("int64_list", [7])}


@pytest.mark.parametrize("doc, message", [
    ({"signature_name": "s"}, "'examples' is expected and was not found"),
    ({"examples": {"x": 1.0}}, "Expecting 'examples' value to be an list/array"),
    ({"examples": []}, "'examples' value is an empty array"),
    ({"examples": [[1.0]]}, "Example must be JSON object but got JSON Array"),
    ({"examples": [{"x": [1.0, 2]}]}, "Unexpected element type in feature: x expecting type: "
                                      "float"),
    ({"examples": [{"x": None}]}, "Feature: x has element with unexpected JSON type: Null"),
    ({"examples": [{"x": [[1.0]]}]}, "Feature: x has element with unexpected JSON type: Array"),
    ({"examples": [{"x": {"a": 1}}]}, "Feature: x has element with unexpected JSON type: Object"),
    ({"examples": [{"x": 2 ** 63}]}, "Only int64_t is supported"),
    ({"examples": [{"x": {"b64": "!!"}}]}, "Unable to base64 decode"),
    ({"signature_name": 3, "examples": [{}]}, "'signature_name' key must be a string value"),
    ([{"x": 1.0}], "Is not object"),
])
def test_bad_documents_are_refused_with_tf_servings_messages(doc, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[")):
        examples_from_json(doc)


def test_malformed_json_is_an_invalid_input():
    with pytest.raises(InvalidInputError, match="Malformed JSON"):
        examples_from_json(b'{"examples": [')


def test_grpc_inputs_give_the_same_serialized_examples():
    request = classification_pb2.ClassificationRequest()
    request.input.example_list_with_context.context.features.feature[
        "c"].int64_list.value.append(5)
    ex = request.input.example_list_with_context.examples.add()
    ex.features.feature["x"].float_list.value.append(2.0)
    got = examples_from_input_proto(request.input)
    assert [parse(s) for s in got] == [parse(s) for s in examples_from_json(
        {"context": {"c": 5}, "examples": [{"x": 2.0}]})]
    plain = input_pb2.Input()
    plain.example_list.examples.add().features.feature["x"].float_list.value.append(1.0)
    assert [parse(s) for s in examples_from_input_proto(plain)] == [
        {"x": ("float_list", [1.0])}]
    with pytest.raises(InvalidInputError, match="Input is empty"):
        examples_from_input_proto(input_pb2.Input())


def test_prepare_gives_the_signatures_string_input(sigs):
    serialized = examples_from_json({"examples": [{"x": 1.0}, {"x": 2.0}]})
    got = prepare_examples(sigs, "classify_x_to_y", "classify", serialized)
    assert list(got) == ["inputs"]
    assert got["inputs"].dtype == object and list(got["inputs"]) == serialized
    assert list(prepare_examples(sigs, "regress_x_to_y", "regress", serialized)) == ["inputs"]


@pytest.mark.parametrize("name, method, message", [
    ("", "classify", "Expected classification signature method_name to be "
                     "tensorflow/serving/classify. Was: tensorflow/serving/predict"),
    ("serving_default", "regress", "Expected regression signature method_name to be "
                                   "tensorflow/serving/regress. Was: tensorflow/serving/predict"),
    ("classify_x_to_y", "regress", "Expected regression signature method_name to be "
                                   "tensorflow/serving/regress. Was: tensorflow/serving/classify"),
    ("nope", "classify", "No signature was found with the name: nope"),
])
def test_signatures_that_cannot_classify_or_regress_are_refused(sigs, name, method, message):
    with pytest.raises(InvalidInputError, match=message):
        prepare_examples(sigs, name, method, [b""])


def test_a_keras_model_has_no_classify_signature():
    with pytest.raises(InvalidInputError, match=r"No signature was found.*:predict"):
        prepare_examples(None, "", "classify", [b""])


def test_a_tf2_predict_signature_shaped_for_classify_is_accepted():
    # TF2 writes every signature with the predict method; TF Serving serves those that fit.
    sig = {"c": {"method_name": "tensorflow/serving/predict",
                 "inputs": {"inputs": {"dtype": "DT_STRING"}},
                 "outputs": {"scores": {"dtype": "DT_FLOAT"}}}}
    assert list(prepare_examples(sig, "c", "classify", [b""])) == ["inputs"]
    with pytest.raises(InvalidInputError, match="regression signature method_name"):
        prepare_examples(sig, "c", "regress", [b""])


def test_classify_results_pair_classes_and_scores():
    sig = {"serving_default": {"method_name": "tensorflow/serving/classify",
                               "inputs": {"inputs": {}},
                               "outputs": {"classes": {}, "scores": {}}}}
    outputs = {"classes": np.array([[b"cat", b"dog"], [b"cat", b"dog"]], dtype=object),
               "scores": np.array([[0.25, 0.75], [1.0, np.nan]], np.float32)}
    got = classify_results(sig, "", outputs)
    assert got[0] == [("cat", 0.25), ("dog", 0.75)]
    assert got[1][0] == ("cat", 1.0) and math.isnan(got[1][1][1])
    only_classes = classify_results(sig, "", {"classes": outputs["classes"][:1]})
    assert only_classes == [[("cat", 0.0), ("dog", 0.0)]]
    with pytest.raises(InvalidInputError, match="should match in dim_size"):
        classify_results(sig, "", {"classes": outputs["classes"], "scores": np.ones((2, 3))})
    with pytest.raises(InvalidInputError, match=r"\[batch_size num_classes\] but got \[2\]"):
        classify_results(sig, "", {"scores": np.ones(2, np.float32)})


def test_scores_alone_give_empty_labels_as_tf_serving_does(sigs):
    got = classify_results(sigs, "classify_x_to_y", np.array([[3.0]], np.float32))
    assert got == [[("", 3.0)]]
    assert json.loads(results_json(got)) == {"results": [[["", 3.0]]]}


def test_regress_results_and_their_json(sigs):
    got = regress_results(sigs, "regress_x_to_y", np.array([[3.0], [np.inf]], np.float32))
    assert got == [3.0, math.inf]
    assert results_json(got) == b'{"results":[3.0,Infinity]}'
    assert results_json([math.nan, -math.inf, 0.1]) == b'{"results":[NaN,-Infinity,0.1]}'
    with pytest.raises(InvalidInputError, match=r"\[batch_size\] or \[batch_size, 1\]"):
        regress_results(sigs, "regress_x_to_y", np.ones((2, 2), np.float32))
    with pytest.raises(InvalidInputError, match="DT_FLOAT"):
        regress_results(sigs, "regress_x_to_y", np.ones((2, 1), np.int32))


def test_results_fill_tf_servings_protos():
    classification = classification_pb2.ClassificationResult()
    fill_classification(classification, [[("a", 0.5), ("b", 0.25)], [("", 3.0)]])
    assert [[(c.label, c.score) for c in cl.classes]
            for cl in classification.classifications] == [[("a", 0.5), ("b", 0.25)], [("", 3.0)]]
    regression = regression_pb2.RegressionResult()
    fill_regression(regression, [3.0, 4.5])
    assert [r.value for r in regression.regressions] == [3.0, 4.5]
