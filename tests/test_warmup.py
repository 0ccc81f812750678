"""TF Serving's SavedModel warm-up (`server/_warmup.py`).

Each test writes `assets.extra/tf_serving_warmup_requests` (a TFRecord file
of `PredictionLog` protos, as TF Serving's warm-up guide says) into a copy
of TF Serving's `half_plus_two` test model, and checks that the records are
replayed through the version's Predictors, and that a bad record fails the
load with the file and the record's index named.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
    regression_pb2,
)

from keras_tandem.server._repository import (
    AVAILABLE,
    ServedModel,
    VersionWatcher,
    servable_from_saved_model,
)
from keras_tandem.server._warmup import (
    MAX_RECORDS,
    WARMUP_FILE,
    read_warmup_requests,
    replay_warmup,
)

HALF_PLUS_TWO = (Path(__file__).parent / "data" / "tf_serving" / "saved_model_half_plus_two_cpu"
                 / "00000123")
OPTIONS = {"max_batch_size": 8}


def predict_log(signature="", x=(2.0,)):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
        name="m", signature_name=signature))
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array(x, np.float32).reshape(-1, 1)))
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))


def classify_log():
    request = classification_pb2.ClassificationRequest()
    request.model_spec.signature_name = "classify_x_to_y"
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(2.0)
    return prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=request))


def regress_log():
    request = regression_pb2.RegressionRequest()
    request.model_spec.signature_name = "regress_x_to_y"
    listed = request.input.example_list_with_context
    listed.context.features.feature["x"].float_list.value.append(1.0)
    listed.examples.add()
    return prediction_log_pb2.PredictionLog(
        regress_log=prediction_log_pb2.RegressLog(request=request))


def multi_inference_log():
    request = inference_pb2.MultiInferenceRequest()
    request.input.example_list.examples.add().features.feature["x"].float_list.value.append(4.0)
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y2", "tensorflow/serving/regress")):
        task = request.tasks.add()
        task.model_spec.signature_name = signature
        task.method_name = method
    return prediction_log_pb2.PredictionLog(
        multi_inference_log=prediction_log_pb2.MultiInferenceLog(request=request))


def write_warmup(version_dir, logs):
    path = Path(version_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log if isinstance(log, bytes) else log.SerializeToString())
    return path


@pytest.fixture
def version_dir(tmp_path):
    target = tmp_path / "half_plus_two" / "00000123"
    shutil.copytree(HALF_PLUS_TWO, target)
    return target


@pytest.fixture(scope="module")
def servable():
    s = servable_from_saved_model(HALF_PLUS_TWO, 123, OPTIONS)
    yield s
    s.close()


def requests_of(servable, signature):
    return servable.for_signature(signature).predictor.stats()["requests"]


def test_every_kind_of_record_is_replayed_through_its_signatures_predictor(version_dir,
                                                                           servable):
    write_warmup(version_dir, [predict_log(), predict_log("serving_default", (1.0, 3.0)),
                               classify_log(), regress_log(), multi_inference_log()])
    assert len(read_warmup_requests(version_dir)) == 5
    before = {s: requests_of(servable, s) for s in
              ("serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x_to_y2")}
    assert replay_warmup(servable, version_dir) == 5
    after = {s: requests_of(servable, s) for s in before}
    assert {s: after[s] - before[s] for s in before} == {
        "serving_default": 2, "classify_x_to_y": 2, "regress_x_to_y": 1, "regress_x_to_y2": 1}


def test_no_warmup_file_replays_nothing(version_dir, servable):
    assert read_warmup_requests(version_dir) == []
    assert replay_warmup(servable, version_dir) == 0


@pytest.mark.parametrize("bad, message", [
    (predict_log("nope"), "No signature was found with the name: nope"),
    (prediction_log_pb2.PredictionLog(
        session_run_log=prediction_log_pb2.SessionRunLog()), "Unsupported log_type"),
    (prediction_log_pb2.PredictionLog(), "Unsupported log_type"),
])
def test_a_bad_record_fails_with_the_file_and_its_index(version_dir, servable, bad, message):
    path = write_warmup(version_dir, [predict_log(), bad])
    with pytest.raises(ValueError, match=message) as info:
        replay_warmup(servable, version_dir)
    assert f"Warm-up record 1 of {path}" in str(info.value)


def test_a_record_that_is_no_prediction_log_or_a_file_that_is_no_tfrecord_is_refused(
        version_dir, servable):
    path = write_warmup(version_dir, [b"\xff\xff\xff not a proto"])
    with pytest.raises(ValueError, match=r"Failed to parse warmup record 0 from .*PredictionLog"):
        read_warmup_requests(version_dir)
    path.write_bytes(b"this is not a TFRecord file at all")
    with pytest.raises(ValueError, match="not a readable TFRecord file"):
        replay_warmup(servable, version_dir)


def test_more_than_tf_servings_maximum_of_records_is_refused(version_dir):
    write_warmup(version_dir, [predict_log()] * (MAX_RECORDS + 1))
    with pytest.raises(ValueError, match=f"exceeds the maximum \\({MAX_RECORDS}\\)"):
        read_warmup_requests(version_dir)


def test_a_version_whose_warmup_fails_is_not_served(version_dir):
    base = version_dir.parent
    write_warmup(version_dir, [predict_log(), predict_log("nope")])
    served = ServedModel("w")
    watcher = VersionWatcher(served, base, OPTIONS, poll_interval_s=3600)
    try:
        watcher.load_initial()
        states = {e["version"]: e for e in served.status()}
        assert states["123"]["state"] != AVAILABLE
        assert "Warm-up record 1" in states["123"]["status"]["error_message"]
        assert served.loaded_versions == []
        # a good warm-up file: the version loads once it is fixed
        write_warmup(version_dir, [predict_log(), classify_log()])
        watcher.poll_once()
        watcher.poll_once()
        states = {e["version"]: e["state"] for e in served.status()}
        assert states["123"] == AVAILABLE
    finally:
        watcher.stop()
        for v in served.loaded_versions:
            served.get(v).close()
