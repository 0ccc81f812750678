"""TF Serving's SavedModel warm-up: replaying recorded requests before a version serves.

Owns reading `assets.extra/tf_serving_warmup_requests` (a TFRecord file of
`tensorflow.serving.PredictionLog` protos, as TF Serving's warm-up guide
describes it, at most `MAX_RECORDS` of them) and replaying each record's
request (predict, classify, regress, multi-inference) through the servable's
own Predictors, synchronously, so the first real requests find every
signature traced and warm. A record that fails fails the load, as in TF
Serving, with the file and the record's index in the message.

When to call it (before a version becomes AVAILABLE) stays with the loading
path in `_repository`; the request formats stay in `_examples`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from keras_tandem.server._examples import (
    CLASSIFY,
    CLASSIFY_METHOD,
    REGRESS,
    REGRESS_METHOD,
    classify_results,
    examples_from_input_proto,
    prepare_examples,
    regress_results,
)

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving's WarmupConsts::kMaxNumRecords.
MAX_RECORDS = 1000


def warmup_file(version_dir: str | os.PathLike) -> Path:
    """Where a version's warm-up records live (the file need not exist)."""
    return Path(version_dir) / WARMUP_FILE


def read_warmup_requests(version_dir: str | os.PathLike) -> list[Any]:
    """The warm-up records of a SavedModel version directory.

    Args:
        version_dir: the version's directory (holding `saved_model.pb`).

    Returns:
        The `PredictionLog` protos of `assets.extra/tf_serving_warmup_requests`,
        in file order; empty when there is no such file (warm-up is optional).

    Raises:
        ValueError: the file is not a TFRecord file of `PredictionLog`
            protos, or holds more than `MAX_RECORDS` records.
    """
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    from tensorflow_serving.apis import prediction_log_pb2

    path = warmup_file(version_dir)
    if not path.is_file():
        return []
    records = []
    try:
        for i, raw in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
            if i >= MAX_RECORDS:
                raise ValueError(f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) "
                                 f"at {path}; keep a representative sample of at most "
                                 f"{MAX_RECORDS} requests.")
            log = prediction_log_pb2.PredictionLog()
            try:
                log.ParseFromString(raw)
            except DecodeError:
                raise ValueError(f"Failed to parse warmup record {i} from {path}: it is not a "
                                 "tensorflow.serving.PredictionLog proto.") from None
            records.append(log)
    except tf.errors.OpError as e:
        raise ValueError(f"{path} is not a readable TFRecord file of PredictionLog protos "
                         f"({e.message}); write it with tf.io.TFRecordWriter.") from None
    return records


def replay_warmup(servable: Any, version_dir: str | os.PathLike) -> int:
    """Replays a version's warm-up records through its Predictors, one at a time.

    Args:
        servable: the version's `Servable` (its `signature_def` names the
            classify / regress signatures; `for_signature` finds the
            Predictor of each signature).
        version_dir: the version's directory.

    Returns:
        How many records were replayed (0 without a warm-up file).

    Raises:
        ValueError: the file cannot be read, or a record cannot be replayed
            (unknown signature, wrong inputs, an unsupported log type); the
            message names the file and the record's index, and the version
            should not be served.
    """
    path = warmup_file(version_dir)
    records = read_warmup_requests(version_dir)
    for i, log in enumerate(records):
        try:
            _replay(servable, log)
        except Exception as e:
            raise ValueError(f"Warm-up record {i} of {path} failed: {e}") from e
    return len(records)


def _replay(servable: Any, log: Any) -> None:
    kind = log.WhichOneof("log_type")
    if kind == "predict_log":
        _predict(servable, log.predict_log.request)
    elif kind == "classify_log":
        request = log.classify_log.request
        _classify_or_regress(servable, request.model_spec.signature_name, CLASSIFY,
                             examples_from_input_proto(request.input))
    elif kind == "regress_log":
        request = log.regress_log.request
        _classify_or_regress(servable, request.model_spec.signature_name, REGRESS,
                             examples_from_input_proto(request.input))
    elif kind == "multi_inference_log":
        request = log.multi_inference_log.request
        serialized = examples_from_input_proto(request.input)
        methods = {CLASSIFY_METHOD: CLASSIFY, REGRESS_METHOD: REGRESS}
        for task in request.tasks:
            if task.method_name not in methods:
                raise ValueError(f"Unsupported signature method_name in a multi-inference "
                                 f"task: {task.method_name!r} (expected {sorted(methods)}).")
            _classify_or_regress(servable, task.model_spec.signature_name,
                                 methods[task.method_name], serialized)
    else:
        raise ValueError(f"Unsupported log_type for warmup: {kind or 'none'} (TF Serving "
                         "replays predict_log, classify_log, regress_log and "
                         "multi_inference_log).")


def _signature_servable(servable: Any, name: str) -> Any:
    found = servable.for_signature(name)
    if found is None:
        known = getattr(servable, "signature_names", None)
        raise ValueError(f"No signature was found with the name: {name}"
                         + (f" (the model's signatures: {known})" if known else ""))
    return found


def _predict(servable: Any, request: Any) -> None:
    import tensorflow as tf

    target = _signature_servable(servable, request.model_spec.signature_name)
    inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
    names = [spec.name for spec in target.predictor.inputs]
    if len(names) == 1 and len(inputs) == 1 and names[0] not in inputs:
        x: Any = next(iter(inputs.values()))  # a lone input may be named as the signature says
    else:
        x = inputs
    target.predictor.predict(x)


def _classify_or_regress(servable: Any, name: str, method: str, serialized: list[bytes]) -> None:
    x = prepare_examples(servable.signature_def, name, method, serialized)
    target = _signature_servable(servable, name)
    outputs = target.predictor.predict(x)
    if method == CLASSIFY:
        classify_results(servable.signature_def, name, outputs)
    else:
        regress_results(servable.signature_def, name, outputs)
