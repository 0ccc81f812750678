"""TF Serving's Classify and Regress APIs: `tf.train.Example` inputs, class/score results.

Owns, for both REST (`:classify` / `:regress`) and gRPC (`Classify` / `Regress`):
- turning a request's examples into serialized `tf.train.Example` protos:
  `examples_from_json` for the REST body (`examples`, optional `context`),
  `examples_from_input_proto` for the gRPC `tensorflow.serving.Input`; a
  context is merged into each example as TF Serving does, by concatenating
  the serialized protos (the example's features win);
- `prepare_examples`: checking that a signature can classify / regress and
  giving its single string input (the serialized examples) as the
  Predictor's input;
- `classify_results` / `regress_results`: reading the signature's `classes`,
  `scores` or `outputs` tensors as TF Serving's `classifier.cc` /
  `regressor.cc` do, with their error messages;
- writing the results: `results_json` (the REST body), `fill_classification`
  / `fill_regression` (the gRPC protos).

Routes, lookups and status codes stay in `_app` (REST) and `_grpc`. Error
messages follow TF Serving's wording; every error is an `InvalidInputError`
(HTTP 400, gRPC INVALID_ARGUMENT). TensorFlow's protos are imported where
they are needed, so importing this module loads no TensorFlow.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from keras_tandem.errors import InvalidInputError

CLASSIFY = "classify"
REGRESS = "regress"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
PREDICT_METHOD = "tensorflow/serving/predict"
DEFAULT_SIGNATURE = "serving_default"
# Keys of TF's classification / regression signatures (signature_constants.py).
INPUTS_KEY = "inputs"
CLASSES_KEY = "classes"
SCORES_KEY = "scores"
OUTPUTS_KEY = "outputs"

_METHODS = {CLASSIFY: CLASSIFY_METHOD, REGRESS: REGRESS_METHOD}
_WHAT = {CLASSIFY: "classification", REGRESS: "regression"}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_TOKENS = {"nan": orjson.Fragment(b"NaN"), "inf": orjson.Fragment(b"Infinity"),
           "-inf": orjson.Fragment(b"-Infinity")}


# ------------------------------------------------------------------ requests


def examples_from_json(doc: Mapping[str, Any] | bytes | bytearray | str) -> list[bytes]:
    """A REST classify / regress body as serialized `tf.train.Example` protos.

    Features are typed as TF Serving's REST API infers them: JSON integers
    and booleans become an `int64_list`, numbers with a fraction or exponent
    (and `NaN` / `Infinity`) a `float_list`, strings and `{"b64": ...}`
    objects a `bytes_list`. A feature's value is one such value or a list of
    values of one kind.

    Args:
        doc: the parsed body, `{"signature_name": ..., "context": {...},
            "examples": [{feature: value, ...}, ...]}` (or the raw body).

    Returns:
        One serialized `Example` per entry of `examples`, each with the
        `context` features merged in (the example's own features win).

    Raises:
        InvalidInputError: the document is not of that form; the message
            follows TF Serving's.
    """
    from tensorflow.core.example import example_pb2

    if isinstance(doc, (bytes, bytearray, str)):
        doc = _loads(doc)
    if not isinstance(doc, Mapping):
        raise InvalidInputError(f"JSON Value: {_short(doc)} Is not object")
    name = doc.get("signature_name")
    if name is not None and not isinstance(name, str):
        raise InvalidInputError(f"JSON Value: {_short(doc)} not formatted correctly. "
                                "'signature_name' key must be a string value.")
    context = b""
    if "context" in doc:
        context = _example(doc["context"], example_pb2).SerializeToString()
    if "examples" not in doc:
        raise InvalidInputError(
            f"JSON Value: {_short(doc)} When method is classify or regress, key 'examples' "
            "is expected and was not found. Send {\"examples\": [{\"feature\": value, ...}]}.")
    examples = doc["examples"]
    if not isinstance(examples, list):
        raise InvalidInputError(
            f"JSON Value: {_short(doc)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise InvalidInputError(f"JSON Value: {_short(doc)} 'examples' value is an empty array")
    return [context + _example(e, example_pb2).SerializeToString() for e in examples]


def examples_from_input_proto(input_proto: Any) -> list[bytes]:
    """A gRPC `tensorflow.serving.Input` as serialized `tf.train.Example` protos.

    Args:
        input_proto: the request's `input` (`example_list`, or
            `example_list_with_context` whose context is merged into each
            example, the example's own features winning).

    Returns:
        One serialized `Example` per example.

    Raises:
        InvalidInputError: the input holds no example ("Input is empty.").
    """
    kind = input_proto.WhichOneof("kind")
    if kind == "example_list":
        serialized = [e.SerializeToString() for e in input_proto.example_list.examples]
    elif kind == "example_list_with_context":
        listed = input_proto.example_list_with_context
        context = listed.context.SerializeToString()
        serialized = [context + e.SerializeToString() for e in listed.examples]
    else:
        serialized = []
    if not serialized:
        raise InvalidInputError("Input is empty.")
    return serialized


def _loads(body: bytes | bytearray | str) -> Any:
    try:
        # The standard library takes NaN / Infinity tokens and huge numbers, as TF Serving does.
        return json.loads(body)
    except ValueError as e:
        raise InvalidInputError(f"Malformed JSON in the request body: {e}") from None


def _example(features: Any, example_pb2: Any) -> Any:
    if not isinstance(features, Mapping):
        raise InvalidInputError(
            f"Example must be JSON object but got JSON {_json_type(features)}")
    example = example_pb2.Example()
    feature_map = example.features.feature
    for name, content in features.items():
        feature = feature_map[name]  # an empty list stays a Feature with no kind
        for value in content if isinstance(content, list) else [content]:
            _add_value(feature, name, value)
    return example


def _add_value(feature: Any, name: str, value: Any) -> None:
    """Appends one JSON value to `feature` (TF Serving's `AddValueToFeature`)."""
    if isinstance(value, bool):
        _kind(feature, name, "int64_list").value.append(int(value))
    elif isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            if 0 < value <= _UINT64_MAX:
                raise InvalidInputError(f"Feature: {name} has uint64_t element. Only int64_t is "
                                        "supported.")
            value = float(value)  # beyond uint64: JSON parsers read it as a double
            _kind(feature, name, "float_list").value.append(_float32(value))
        else:
            _kind(feature, name, "int64_list").value.append(value)
    elif isinstance(value, float):
        _kind(feature, name, "float_list").value.append(_float32(value))
    elif isinstance(value, str):
        _kind(feature, name, "bytes_list").value.append(value.encode("utf-8"))
    elif isinstance(value, Mapping) and _is_b64(value):
        _kind(feature, name, "bytes_list").value.append(_b64decode(value))
    else:
        raise InvalidInputError(f"Feature: {name} has element with unexpected JSON type: "
                                f"{_json_type(value)}")


def _kind(feature: Any, name: str, kind: str) -> Any:
    current = feature.WhichOneof("kind")
    if current not in (None, kind):
        raise InvalidInputError(f"Unexpected element type in feature: {name} expecting type: "
                                f"{current.split('_')[0]}")
    return getattr(feature, kind)


def _float32(value: float) -> float:
    if math.isfinite(value) and abs(value) > float(np.finfo(np.float32).max):
        return math.copysign(math.inf, value)  # overflows to +/-Infinity, as in TF Serving
    return value


def _is_b64(value: Mapping) -> bool:
    return len(value) == 1 and isinstance(value.get("b64"), str)


def _b64decode(value: Mapping) -> bytes:
    text = value["b64"]
    text = text.replace("-", "+").replace("_", "/")  # the URL-safe alphabet too, as absl's
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("Unable to base64 decode") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, Mapping):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return type(value).__name__


def _short(doc: Any, limit: int = 200) -> str:
    try:
        text = json.dumps(doc)
    except (TypeError, ValueError):
        text = repr(doc)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------ signatures


def _signature(signature_def: Mapping[str, Any] | None, signature_name: str | None) -> tuple[
        str, Mapping[str, Any]]:
    name = signature_name or DEFAULT_SIGNATURE
    if signature_def is None:
        raise InvalidInputError(
            f"No signature was found with the name: {name}. This model is a Keras model, "
            "whose only signature is a predict signature; classify and regress need a "
            "SavedModel signature with method_name tensorflow/serving/classify or "
            "tensorflow/serving/regress. Use :predict instead.")
    sig = signature_def.get(name)
    if sig is None:
        known = sorted(n for n in signature_def if not n.startswith("__"))
        raise InvalidInputError(
            f"No signature was found with the name: {name} (the model's signatures: {known}).")
    return name, sig


def _check_method(name: str, sig: Mapping[str, Any], method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be {CLASSIFY!r} or {REGRESS!r}, not {method!r}")
    got = sig.get("method_name", "")
    if got == _METHODS[method]:
        return
    # TF2 SavedModels write every signature as a predict signature; TF Serving (without
    # --enable_signature_method_name_check) serves them when their keys fit.
    inputs, outputs = sig.get("inputs", {}), sig.get("outputs", {})
    if method == CLASSIFY:
        fits = set(outputs) <= {CLASSES_KEY, SCORES_KEY} and bool(outputs)
    else:
        fits = set(outputs) == {OUTPUTS_KEY}
    if got in ("", PREDICT_METHOD) and set(inputs) == {INPUTS_KEY} and fits:
        return
    raise InvalidInputError(
        f"Expected {_WHAT[method]} signature method_name to be {_METHODS[method]}. Was: {got} "
        f"(signature {name!r}).")


def _check_structure(sig: Mapping[str, Any], method: str) -> None:
    inputs, outputs = sig.get("inputs", {}), sig.get("outputs", {})
    if len(inputs) != 1:
        raise InvalidInputError("Expected one input Tensor.")
    if method == CLASSIFY:
        if len(outputs) not in (1, 2):
            raise InvalidInputError(f"Expected one or two output Tensors, found {len(outputs)}")
        if INPUTS_KEY not in inputs:
            raise InvalidInputError(
                f"No classification inputs found in SignatureDef: {_short(sig)}")
        if CLASSES_KEY not in outputs and SCORES_KEY not in outputs:
            raise InvalidInputError(
                'Expected classification signature outputs to contain at least one of '
                f'"{CLASSES_KEY}" or "{SCORES_KEY}". Signature was: {_short(sig)}')
    else:
        if len(outputs) != 1:
            raise InvalidInputError("Expected one output Tensor.")
        if INPUTS_KEY not in inputs:
            raise InvalidInputError(f"No regression inputs found in SignatureDef: {_short(sig)}")
        if OUTPUTS_KEY not in outputs:
            raise InvalidInputError(f"No regression outputs found in SignatureDef: {_short(sig)}")


def prepare_examples(signature_def: Mapping[str, Any] | None, signature_name: str | None,
                     method: str, serialized: Sequence[bytes]) -> dict[str, np.ndarray]:
    """The Predictor input of a classify / regress request.

    Args:
        signature_def: the servable's `signature_def` map (`signature_def_doc`),
            None for a Keras model (which has no such signature).
        signature_name: the requested signature ("" or None: `serving_default`).
        method: `"classify"` or `"regress"`.
        serialized: the serialized `tf.train.Example` protos.

    Returns:
        `{input key: object array of the serialized examples}`, the
        signature's single input (key `inputs`).

    Raises:
        InvalidInputError: no such signature, or it cannot classify / regress
            (TF Serving's "Expected classification signature method_name to
            be tensorflow/serving/classify. Was: ..."), or no example.
    """
    name, sig = _signature(signature_def, signature_name)
    _check_method(name, sig, method)
    _check_structure(sig, method)
    if not serialized:
        raise InvalidInputError("Input is empty.")
    arr = np.empty(len(serialized), dtype=object)
    arr[:] = [bytes(s) for s in serialized]
    return {INPUTS_KEY: arr}


# ------------------------------------------------------------------ results


def _named_outputs(sig: Mapping[str, Any], outputs: Any) -> Mapping[str, Any]:
    if isinstance(outputs, Mapping):
        return outputs
    keys = list(sig.get("outputs", {}))
    if len(keys) != 1:
        raise InvalidInputError(f"Expected {len(keys)} named output tensor(s), got one "
                                "unnamed tensor.")
    return {keys[0]: outputs}


def _shape(arr: np.ndarray) -> str:
    return "[" + ",".join(str(d) for d in arr.shape) + "]"


def classify_results(signature_def: Mapping[str, Any] | None, signature_name: str | None,
                     outputs: Mapping[str, Any] | np.ndarray) -> list[list[tuple[str, float]]]:
    """Per example, its `(label, score)` pairs, as TF Serving's classifier pairs them.

    A signature with only `scores` gives empty labels; one with only
    `classes` gives scores of 0.0 (TF Serving's `ClassificationResult`
    leaves the missing field at its default).

    Args:
        signature_def: the servable's `signature_def` map.
        signature_name: the requested signature ("" or None: `serving_default`).
        outputs: what the signature's Predictor answered: a dict keyed by
            output name (`classes`, `scores`), or the lone output tensor.

    Returns:
        `[[(label, score), ...] per example]`.

    Raises:
        InvalidInputError: the outputs are not `[batch, num_classes]`
            string classes / float scores that agree (TF Serving's messages).
    """
    _, sig = _signature(signature_def, signature_name)
    named = _named_outputs(sig, outputs)
    classes = named.get(CLASSES_KEY)
    scores = named.get(SCORES_KEY)
    if classes is None and scores is None:
        raise InvalidInputError('Expected classification signature outputs to contain at least '
                                f'one of "{CLASSES_KEY}" or "{SCORES_KEY}". Got: {sorted(named)}')
    if classes is not None:
        classes = np.asarray(classes)
        if classes.ndim != 2:
            raise InvalidInputError("Expected Tensor shape: [batch_size num_classes] but got "
                                    f"{_shape(classes)}")
        if classes.dtype.kind not in "OSU":
            raise InvalidInputError(f"Expected classes Tensor of DT_STRING. Got: {classes.dtype}")
    if scores is not None:
        scores = np.asarray(scores)
        if scores.ndim != 2:
            raise InvalidInputError("Expected Tensor shape: [batch_size num_classes] but got "
                                    f"{_shape(scores)}")
        if scores.dtype.kind != "f":
            raise InvalidInputError(f"Expected scores Tensor of DT_FLOAT. Got: {scores.dtype}")
        scores = scores.astype(np.float32, copy=False)
    if classes is not None and scores is not None:
        if classes.shape[0] != scores.shape[0]:
            raise InvalidInputError(f"Expected classes output batch size of {scores.shape[0]}. "
                                    f"Got: {classes.shape[0]}")
        if classes.shape[1] != scores.shape[1]:
            raise InvalidInputError("Tensors class and score should match in dim_size(1). Got "
                                    f"{classes.shape[1]} vs. {scores.shape[1]}")
    shape = (classes if classes is not None else scores).shape
    results = []
    for i in range(shape[0]):
        row = []
        for c in range(shape[1]):
            label = _label(classes[i, c]) if classes is not None else ""
            score = float(scores[i, c]) if scores is not None else 0.0
            row.append((label, score))
        results.append(row)
    return results


def _label(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def regress_results(signature_def: Mapping[str, Any] | None, signature_name: str | None,
                    outputs: Mapping[str, Any] | np.ndarray) -> list[float]:
    """Per example, its regression value, as TF Serving's regressor reads it.

    Args:
        signature_def: the servable's `signature_def` map.
        signature_name: the requested signature ("" or None: `serving_default`).
        outputs: what the signature's Predictor answered: a dict keyed by
            output name (`outputs`), or the lone output tensor.

    Returns:
        One float per example.

    Raises:
        InvalidInputError: the output is not a float `[batch]` or
            `[batch, 1]` tensor (TF Serving's messages).
    """
    _, sig = _signature(signature_def, signature_name)
    named = _named_outputs(sig, outputs)
    if OUTPUTS_KEY not in named:
        raise InvalidInputError(f"Could not find output tensor '{OUTPUTS_KEY}' "
                                f"(the signature answered {sorted(named)}).")
    values = np.asarray(named[OUTPUTS_KEY])
    if not (values.ndim == 1 or (values.ndim == 2 and values.shape[1] == 1)):
        raise InvalidInputError("Expected output Tensor shape to be either [batch_size] or "
                                f"[batch_size, 1] but got {_shape(values)}")
    if values.dtype.kind != "f":
        raise InvalidInputError(f"Expected output Tensor of DT_FLOAT.  Got: {values.dtype}")
    return [float(v) for v in values.astype(np.float32, copy=False).reshape(-1)]


def _number(value: float) -> Any:
    value = np.float32(value)  # written in float32's shortest form, as TF Serving writes floats
    return value if np.isfinite(value) else _TOKENS[str(float(value))]


def results_json(results: Sequence[Any]) -> bytes:
    """The REST answer of a classify or regress request: `{"results": ...}`.

    Args:
        results: `classify_results` (written `[[[label, score], ...], ...]`)
            or `regress_results` (written `[value, ...]`). Non-finite values
            are written as the `NaN`, `Infinity` and `-Infinity` tokens.

    Returns:
        The JSON body.
    """
    doc = [[[label, _number(score)] for label, score in row] if isinstance(row, (list, tuple))
           else _number(row) for row in results]
    return orjson.dumps({"results": doc}, option=orjson.OPT_SERIALIZE_NUMPY)


def fill_classification(result_proto: Any, results: Sequence[Sequence[tuple[str, float]]]) -> None:
    """Appends `results` to a `tensorflow.serving.ClassificationResult`.

    Args:
        result_proto: the response's `result` (`classification_pb2.ClassificationResult`).
        results: `classify_results`.
    """
    for row in results:
        classifications = result_proto.classifications.add()
        for label, score in row:
            classifications.classes.add(label=label, score=score)


def fill_regression(result_proto: Any, results: Sequence[float]) -> None:
    """Appends `results` to a `tensorflow.serving.RegressionResult`.

    Args:
        result_proto: the response's `result` (`regression_pb2.RegressionResult`).
        results: `regress_results`.
    """
    for value in results:
        result_proto.regressions.add(value=value)
