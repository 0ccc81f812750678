"""TF Serving's gRPC API (`server/_grpc.py`) through the real `tensorflow_serving.apis` stubs.

Each server is a `GrpcServer` on 127.0.0.1 over a `SingleModel` lookup,
reached with `grpc.insecure_channel`. The MLP of `_models` is served as
version 7; a gated model holds the worker when a test needs requests to
wait (overload, deadlines, batches shared with REST).
"""

import concurrent.futures
import json
from pathlib import Path

import grpc
import keras
import numpy as np
import pytest
from google.protobuf import json_format
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from _gated import open_gated_model
from _http import request as http_request
from _models import mlp
from _poll import wait_until
from keras_tandem import Predictor, serve
from keras_tandem.server._grpc import GrpcServer
from keras_tandem.server._lookup import SingleModel
from keras_tandem.server._repository import (
    Servable,
    ServedModel,
    probe_outputs,
    servable_from_saved_model,
)
from keras_tandem.server._tensor_proto import TensorError, from_array, to_array

NOT_FOUND, INVALID = grpc.StatusCode.NOT_FOUND, \
    grpc.StatusCode.INVALID_ARGUMENT
TIMEOUT_S = 30


def reference(model, x):
    return keras.ops.convert_to_numpy(model(np.asarray(x, np.float32), training=False))


def served_model(name, predictor, version=None, **kwargs):
    servable = Servable(predictor, probe_outputs(predictor), version, owned=False, **kwargs)
    return ServedModel(name, servable)


class Client:
    """The TF Serving stubs of one channel."""

    def __init__(self, port):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self):
        self.channel.close()


def tensor(values, dtype=types_pb2.DT_FLOAT, shape=None, content=False):
    """A TensorProto as clients build it by hand: typed field or tensor_content."""
    arr = np.asarray(values)
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for d in (arr.shape if shape is None else shape):
        proto.tensor_shape.dim.add().size = d
    if content:
        proto.tensor_content = arr.tobytes()
    elif dtype == types_pb2.DT_FLOAT:
        proto.float_val.extend(arr.ravel().tolist())
    elif dtype == types_pb2.DT_DOUBLE:
        proto.double_val.extend(arr.ravel().tolist())
    elif dtype == types_pb2.DT_INT32:
        proto.int_val.extend(arr.ravel().tolist())
    elif dtype == types_pb2.DT_INT64:
        proto.int64_val.extend(arr.ravel().tolist())
    return proto


def predict_request(inputs, name="mlp", version=None, label=None, signature=None,
                    output_filter=()):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    if signature is not None:
        req.model_spec.signature_name = signature
    for key, proto in inputs.items():
        req.inputs[key].CopyFrom(proto)
    req.output_filter.extend(output_filter)
    return req


def rpc_error(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def output_array(proto):
    return to_array(proto)


# ------------------------------------------------------------------ the MLP


@pytest.fixture(scope="module")
def mlp_server():
    """The MLP served as model `mlp` version 7; every call observed."""
    model = mlp()
    calls = []
    with Predictor(model, max_batch_size=32) as predictor:
        served = served_model("mlp", predictor, version=7)
        server = GrpcServer(SingleModel(served), "127.0.0.1", 0,
                            observe=lambda *a, **k: calls.append((*a, k)))
        port = server.start()
        client = Client(port)
        try:
            yield model, predictor, client, calls
        finally:
            client.close()
            server.stop(1.0)


def mlp_input(predictor):
    return predictor.inputs[0].name


def test_predict_answers_rows_from_typed_fields_as_tf_serving_clients_send_them(mlp_server):
    model, predictor, client, _ = mlp_server
    x = np.random.default_rng(0).random((3, 8), dtype=np.float32)
    r = client.predict.Predict(predict_request({mlp_input(predictor): tensor(x)}), TIMEOUT_S)
    (name,) = r.outputs
    out = r.outputs[name]
    assert out.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in out.tensor_shape.dim] == [3, 4]
    assert not out.tensor_content and len(out.float_val) == 12  # what TF Serving's clients read
    np.testing.assert_allclose(output_array(out), reference(model, x), rtol=1e-5, atol=1e-6)
    assert (r.model_spec.name, r.model_spec.version.value, r.model_spec.signature_name) == \
        ("mlp", 7, "serving_default")


def test_predict_reads_tensor_content(mlp_server):
    model, predictor, client, _ = mlp_server
    x = np.random.default_rng(1).random((2, 8), dtype=np.float32)
    r = client.predict.Predict(
        predict_request({mlp_input(predictor): tensor(x, content=True)}), TIMEOUT_S)
    np.testing.assert_allclose(output_array(next(iter(r.outputs.values()))),
                               reference(model, x), rtol=1e-5, atol=1e-6)


def test_one_typed_value_fills_the_whole_shape_as_tensorflow_reads_it(mlp_server):
    model, predictor, client, _ = mlp_server
    proto = tensor([0.5], shape=(3, 8))
    r = client.predict.Predict(predict_request({mlp_input(predictor): proto}), TIMEOUT_S)
    np.testing.assert_allclose(output_array(next(iter(r.outputs.values()))),
                               reference(model, np.full((3, 8), 0.5)), rtol=1e-5, atol=1e-6)


def test_a_pinned_version_answers_and_another_one_is_not_found(mlp_server):
    _, predictor, client, _ = mlp_server
    inputs = {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}
    assert client.predict.Predict(predict_request(inputs, version=7),
                                  TIMEOUT_S).model_spec.version.value == 7
    code, details = rpc_error(client.predict.Predict, predict_request(inputs, version=3),
                              TIMEOUT_S)
    assert code == NOT_FOUND
    assert details == "Servable not found for request: Specific(mlp, 3)"


@pytest.mark.parametrize("spec, text", [
    ({"name": "nope"}, "Latest(nope)"),
    ({"name": "nope", "version": 7}, "Specific(nope, 7)"),
])
def test_unknown_models_versions_and_labels_are_not_found_in_tf_servings_words(
        mlp_server, spec, text):
    _, predictor, client, calls = mlp_server
    inputs = {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}
    code, details = rpc_error(client.predict.Predict, predict_request(inputs, **spec), TIMEOUT_S)
    assert code == NOT_FOUND
    assert details.startswith(f"Servable not found for request: {text}")
    assert ("grpc_predict", 404, spec["name"]) in [(c[0], c[1], c[4]["model"]) for c in calls]


def test_an_unknown_label_is_an_invalid_argument_as_in_tf_serving(mlp_server):
    _, predictor, client, _ = mlp_server
    inputs = {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}
    code, details = rpc_error(client.predict.Predict, predict_request(inputs, label="stable"),
                              TIMEOUT_S)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "Unrecognized servable version label: stable"


def test_an_unknown_signature_fails_its_precondition_as_in_tf_serving(mlp_server):
    _, predictor, client, _ = mlp_server
    inputs = {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}
    code, details = rpc_error(client.predict.Predict,
                              predict_request(inputs, signature="nope"), TIMEOUT_S)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert 'Serving signature key "nope" not found.' in details


@pytest.mark.parametrize("make, expected", [
    (lambda n: {n: tensor(np.zeros((1, 8)), types_pb2.DT_DOUBLE)},
     "Expects arg[0] to be DT_FLOAT but DT_DOUBLE is provided"),
    (lambda n: {n: tensor(np.zeros((1, 7), np.float32))}, "shape (1, 7)"),
    (lambda n: {n: tensor(np.zeros(8, np.float32), shape=(2, 8), content=True)},
     "tensor_content"),
    (lambda n: {n: tensor(np.zeros(20, np.float32), shape=(2, 8))}, "20 values"),
    (lambda n: {}, "Missing but required: {" ),
    (lambda n: {n: tensor(np.zeros((1, 8), np.float32)),
                "extra": tensor(np.zeros((1, 8), np.float32))}, "Sent extra: {extra}"),
])
def test_bad_inputs_are_invalid_arguments_that_say_what_is_wrong(mlp_server, make, expected):
    _, predictor, client, calls = mlp_server
    code, details = rpc_error(client.predict.Predict,
                              predict_request(make(mlp_input(predictor))), TIMEOUT_S)
    assert code == INVALID
    assert expected in details
    assert calls[-1][0] == "grpc_predict" and calls[-1][1] == 400
    assert calls[-1][3] == "invalid_input"


def test_successful_calls_are_counted_with_their_latency(mlp_server):
    _, predictor, client, calls = mlp_server
    before = len(calls)
    client.predict.Predict(predict_request(
        {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}), TIMEOUT_S)
    (endpoint, code, seconds, kind, extra), = calls[before:]
    assert (endpoint, code, kind, extra) == ("grpc_predict", 200, None, {"model": "mlp"})
    assert seconds > 0


def test_model_metadata_is_a_signature_def_map_packed_as_tf_serving_does(mlp_server):
    _, predictor, client, _ = mlp_server
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "mlp"
    req.metadata_field.append("signature_def")
    r = client.predict.GetModelMetadata(req, TIMEOUT_S)
    assert (r.model_spec.name, r.model_spec.version.value) == ("mlp", 7)
    assert list(r.metadata) == ["signature_def"]
    sigs = get_model_metadata_pb2.SignatureDefMap()
    assert r.metadata["signature_def"].Unpack(sigs)
    sig = sigs.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    (name, info), = sig.inputs.items()
    assert name == mlp_input(predictor) and info.dtype == types_pb2.DT_FLOAT
    assert [d.size for d in info.tensor_shape.dim] == [-1, 8]
    (out,) = sig.outputs.values()
    assert [d.size for d in out.tensor_shape.dim] == [-1, 4]


@pytest.mark.parametrize("fields, expected", [
    ([], "at least one metadata_field"),
    (["signature_def", "other"], "Metadata field other is not supported"),
])
def test_model_metadata_needs_the_signature_def_field(mlp_server, fields, expected):
    _, _, client, _ = mlp_server
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "mlp"
    req.metadata_field.extend(fields)
    code, details = rpc_error(client.predict.GetModelMetadata, req, TIMEOUT_S)
    assert code == INVALID and expected in details


def test_model_status_lists_the_available_version(mlp_server):
    _, _, client, _ = mlp_server
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "mlp"
    r = client.models.GetModelStatus(req, TIMEOUT_S)
    (status,) = r.model_version_status
    assert status.version == 7
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0
    req.model_spec.version.value = 8
    assert rpc_error(client.models.GetModelStatus, req, TIMEOUT_S)[0] == NOT_FOUND
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "nope"
    code, details = rpc_error(client.models.GetModelStatus, req, TIMEOUT_S)
    assert code == NOT_FOUND and details == "Could not find any versions of model nope"


def test_classify_and_regress_on_a_keras_model_say_to_use_predict(mlp_server):
    from tensorflow_serving.apis import classification_pb2, regression_pb2

    _, _, client, _ = mlp_server
    for call, request_class in ((client.predict.Classify,
                                 classification_pb2.ClassificationRequest),
                                (client.predict.Regress, regression_pb2.RegressionRequest)):
        request = request_class()
        request.model_spec.name = "mlp"
        request.input.example_list.examples.add().features.feature["x"].float_list.value \
            .append(1.0)
        code, details = rpc_error(call, request, TIMEOUT_S)
        assert code == INVALID
        assert "No signature was found with the name: serving_default" in details
        assert "Predict" in details


def test_config_reloads_over_grpc_are_unimplemented_and_say_what_to_do(mlp_server):
    from tensorflow_serving.apis import model_management_pb2

    _, _, client, _ = mlp_server
    code, details = rpc_error(client.models.HandleReloadConfigRequest,
                              model_management_pb2.ReloadConfigRequest(), TIMEOUT_S)
    assert code == grpc.StatusCode.UNIMPLEMENTED and "--model-config-file" in details


# ------------------------------------------------------- several named inputs


@pytest.fixture(scope="module")
def two_inputs():
    """A model of inputs `a` (3 floats) and `ids` (2 int32), outputs `sum` and `scaled`."""
    keras.utils.set_random_seed(5)
    a = keras.Input((3,), name="a")
    ids = keras.Input((2,), name="ids", dtype="int32")
    both = keras.layers.Concatenate()([a, keras.ops.cast(ids, "float32")])
    model = keras.Model({"a": a, "ids": ids},
                        {"sum": keras.layers.Dense(1, name="sum")(both),
                         "scaled": keras.layers.Dense(2, name="scaled")(a)})
    with Predictor(model, max_batch_size=16) as predictor:
        server = GrpcServer(SingleModel(served_model("two", predictor, version=1)),
                            "127.0.0.1", 0)
        client = Client(server.start())
        try:
            yield model, client
        finally:
            client.close()
            server.stop(1.0)


def test_named_inputs_and_every_output(two_inputs):
    model, client = two_inputs
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    ids = np.array([[1, 2], [3, 4]], np.int32)
    r = client.predict.Predict(predict_request(
        {"a": tensor(a), "ids": tensor(ids, types_pb2.DT_INT32)}, name="two"), TIMEOUT_S)
    want = {k: keras.ops.convert_to_numpy(v)
            for k, v in model({"a": a, "ids": ids}, training=False).items()}
    assert sorted(r.outputs) == ["scaled", "sum"]
    for k in want:
        np.testing.assert_allclose(output_array(r.outputs[k]), want[k], rtol=1e-5, atol=1e-6)


def test_output_filter_answers_only_the_outputs_asked_for(two_inputs):
    _, client = two_inputs
    inputs = {"a": tensor(np.zeros((1, 3), np.float32)),
              "ids": tensor(np.zeros((1, 2), np.int32), types_pb2.DT_INT32)}
    r = client.predict.Predict(predict_request(inputs, name="two", output_filter=["scaled"]),
                               TIMEOUT_S)
    assert list(r.outputs) == ["scaled"]
    code, details = rpc_error(client.predict.Predict, predict_request(
        inputs, name="two", output_filter=["nope"]), TIMEOUT_S)
    assert code == INVALID
    assert "output tensor alias not found in signature: nope" in details
    assert "{scaled,sum}" in details
    code, details = rpc_error(client.predict.Predict, predict_request(
        inputs, name="two", output_filter=["sum", "sum"]), TIMEOUT_S)
    assert code == INVALID and "duplicate output tensor alias: sum" in details


def test_an_int64_tensor_for_an_int32_input_is_refused(two_inputs):
    _, client = two_inputs
    inputs = {"a": tensor(np.zeros((1, 3), np.float32)),
              "ids": tensor(np.zeros((1, 2), np.int64), types_pb2.DT_INT64)}
    code, details = rpc_error(client.predict.Predict, predict_request(inputs, name="two"),
                              TIMEOUT_S)
    assert code == INVALID and "DT_INT32" in details and "DT_INT64" in details


# ----------------------------------------------------------- waiting requests


@pytest.fixture
def gated():
    """A gated model served as `gated` over gRPC, and REST on the same Predictor."""
    model, gate = open_gated_model()
    predictor = Predictor(model, max_batch_size=128, queue_size=8, timeout_s=30)
    server = GrpcServer(SingleModel(served_model("gated", predictor, version=1)),
                        "127.0.0.1", 0)
    client = Client(server.start())
    try:
        yield predictor, gate, client
    finally:
        gate.set()
        client.close()
        server.stop(1.0)
        predictor.close()


def gated_request(predictor, value=0.0, rows=1):
    return predict_request({predictor.inputs[0].name: tensor(np.full((rows, 3), value,
                                                                      np.float32))},
                           name="gated")


def hold_worker(predictor, gate):
    gate.clear()
    blocker = predictor.submit(np.zeros(3, np.float32))
    wait_until(lambda: predictor.stats()["queue_depth"] == 0, 20,
               "the worker never took the request")
    return blocker


def test_the_clients_deadline_is_respected_and_its_request_dropped(gated):
    predictor, gate, client = gated
    blocker = hold_worker(predictor, gate)
    code, _ = rpc_error(client.predict.Predict, gated_request(predictor), timeout=0.2)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.set()
    blocker.result(TIMEOUT_S)
    assert client.predict.Predict(gated_request(predictor), TIMEOUT_S).outputs


def test_a_full_queue_is_resource_exhausted(gated):
    predictor, gate, client = gated
    blocker = hold_worker(predictor, gate)
    waiting = [client.predict.Predict.future(gated_request(predictor), TIMEOUT_S)
               for _ in range(8)]
    wait_until(lambda: predictor.stats()["queue_depth"] == 8, 20, "the queue never filled")
    code, details = rpc_error(client.predict.Predict, gated_request(predictor), TIMEOUT_S)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details.lower()
    gate.set()
    blocker.result(TIMEOUT_S)
    assert all(f.result(TIMEOUT_S).outputs for f in waiting)


def test_a_failed_forward_pass_is_internal_and_fails_only_its_batch(gated):
    predictor, _, client = gated
    code, _ = rpc_error(client.predict.Predict, gated_request(predictor, 666.0), TIMEOUT_S)
    assert code == grpc.StatusCode.INTERNAL
    assert client.predict.Predict(gated_request(predictor), TIMEOUT_S).outputs


def test_the_predictors_timeout_is_deadline_exceeded():
    model, gate = open_gated_model()
    predictor = Predictor(model, max_batch_size=8, timeout_s=0.3)
    server = GrpcServer(SingleModel(served_model("gated", predictor, version=1)),
                        "127.0.0.1", 0)
    client = Client(server.start())
    try:
        gate.clear()
        blocker = predictor.submit(np.zeros(3, np.float32))
        wait_until(lambda: predictor.stats()["queue_depth"] == 0, 20)
        code, _ = rpc_error(client.predict.Predict, gated_request(predictor), TIMEOUT_S)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        blocker.result(TIMEOUT_S)  # its batch had started: it is answered
    finally:
        gate.set()
        client.close()
        server.stop(1.0)
        predictor.close()


def test_rest_and_grpc_requests_of_one_server_share_batches(gated):
    predictor, gate, _ = gated
    with serve(predictor, name="gated", port=0, grpc_port=0) as server:
        client = Client(server.grpc_port)
        pool = concurrent.futures.ThreadPoolExecutor(3)
        try:
            blocker = hold_worker(predictor, gate)
            before = predictor.stats()
            rest_answers = [pool.submit(http_request, server.port, "POST",
                                        "/v1/models/gated:predict",
                                        {"instances": [[1.0, 1.0, 1.0]]}) for _ in range(3)]
            grpc_answers = [client.predict.Predict.future(gated_request(predictor, 1.0),
                                                          TIMEOUT_S) for _ in range(3)]
            wait_until(lambda: predictor.stats()["queue_depth"] == 6, 20,
                       "the six requests never queued together")
            gate.set()
            blocker.result(TIMEOUT_S)
            rest_outputs = [f.result(TIMEOUT_S) for f in rest_answers]
            grpc_outputs = [f.result(TIMEOUT_S) for f in grpc_answers]
            after = predictor.stats()
        finally:
            gate.set()
            pool.shutdown()
            client.close()
    assert all(status == 200 for status, _, _ in rest_outputs)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 7 and batches < requests  # the blocker's batch, then the six together
    rest_row = np.asarray(rest_outputs[0][2]["predictions"][0], np.float32)
    grpc_row = output_array(next(iter(grpc_outputs[0].outputs.values())))[0]
    np.testing.assert_allclose(grpc_row, rest_row, rtol=1e-5, atol=1e-6)


def test_serve_counts_grpc_calls_in_its_metrics(mlp_server):
    _, predictor, _, _ = mlp_server
    with serve(predictor, name="mlp", port=0, grpc_port=0) as server:
        client = Client(server.grpc_port)
        try:
            client.predict.Predict(predict_request(
                {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}), TIMEOUT_S)
            rpc_error(client.predict.Predict, predict_request({}, name="nope"), TIMEOUT_S)
        finally:
            client.close()
        _, _, text = http_request(server.port, "GET", "/metrics")
    counted = [line for line in text.splitlines()
               if line.startswith("keras_tandem_http_requests_total") and "grpc_predict" in line]
    assert any('code="200"' in line and line.endswith(" 1.0") for line in counted), counted
    assert any('code="404"' in line for line in counted), counted


# ------------------------------------------------------------ other states


def test_a_model_with_nothing_loaded_is_unavailable():
    server = GrpcServer(SingleModel(ServedModel("empty")), "127.0.0.1", 0)
    client = Client(server.start())
    try:
        code, details = rpc_error(client.predict.Predict, predict_request(
            {"x": tensor(np.zeros((1, 8), np.float32))}, name="empty"), TIMEOUT_S)
        assert code == grpc.StatusCode.UNAVAILABLE and "no version loaded" in details
    finally:
        client.close()
        server.stop(1.0)


def test_a_closed_predictor_is_unavailable():
    predictor = Predictor(mlp(), max_batch_size=8)
    server = GrpcServer(SingleModel(served_model("mlp", predictor, version=1)),
                        "127.0.0.1", 0)
    client = Client(server.start())
    try:
        predictor.close()
        code, _ = rpc_error(client.predict.Predict, predict_request(
            {mlp_input(predictor): tensor(np.zeros((1, 8), np.float32))}), TIMEOUT_S)
        assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        server.stop(1.0)


def test_a_message_over_the_limit_is_refused_and_the_server_keeps_serving():
    with Predictor(mlp(), max_batch_size=8) as predictor:
        server = GrpcServer(SingleModel(served_model("mlp", predictor, version=1)),
                            "127.0.0.1", 0, max_message_bytes=4096)
        client = Client(server.start())
        try:
            name = mlp_input(predictor)
            big = predict_request({name: tensor(np.zeros((200, 8), np.float32))})
            assert rpc_error(client.predict.Predict, big, TIMEOUT_S)[0] == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            small = predict_request({name: tensor(np.zeros((1, 8), np.float32))})
            assert client.predict.Predict(small, TIMEOUT_S).outputs
        finally:
            client.close()
            server.stop(1.0)


def test_a_taken_port_is_an_error_at_start():
    taken = GrpcServer(SingleModel(ServedModel("x")), "127.0.0.1", 0)
    port = taken.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            GrpcServer(SingleModel(ServedModel("x")), "127.0.0.1", port).start()
    finally:
        taken.stop(0.5)


def test_stop_is_idempotent_and_ends_the_thread():
    server = GrpcServer(SingleModel(ServedModel("x")), "127.0.0.1", 0)
    server.start()
    server.stop(0.5)
    server.stop(0.5)
    assert not server._thread.is_alive()


# ------------------------------------------------------- model.export() output


def test_a_savedmodel_from_model_export_serves_with_its_own_signature_def(tmp_path):
    model = mlp(seed=4)
    model.export(str(tmp_path / "1"), verbose=False)
    servable = servable_from_saved_model(tmp_path / "1", 1, {"max_batch_size": 8})
    server = GrpcServer(SingleModel(ServedModel("exported", servable)), "127.0.0.1", 0)
    client = Client(server.start())
    try:
        req = get_model_metadata_pb2.GetModelMetadataRequest()
        req.model_spec.name = "exported"
        req.metadata_field.append("signature_def")
        sigs = get_model_metadata_pb2.SignatureDefMap()
        client.predict.GetModelMetadata(req, TIMEOUT_S).metadata["signature_def"].Unpack(sigs)
        sig = sigs.signature_def["serving_default"]
        (in_key, in_info), = sig.inputs.items()
        (out_key,) = sig.outputs
        assert in_info.name.endswith(":0")  # the graph's tensor names, as TF Serving shows
        x = np.random.default_rng(2).random((2, 8), dtype=np.float32)
        r = client.predict.Predict(predict_request({in_key: tensor(x)}, name="exported"),
                                   TIMEOUT_S)
        assert list(r.outputs) == [out_key]
        np.testing.assert_allclose(output_array(r.outputs[out_key]), reference(model, x),
                                   rtol=1e-5, atol=1e-6)
        assert r.model_spec.version.value == 1
    finally:
        client.close()
        server.stop(1.0)
        servable.close()


# ------------------------------------------------------------ TensorProto


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array([[1.5, -2.0]], np.float64),
    np.array([1, -2, 3], np.int32),
    np.array([[1 << 40]], np.int64),
    np.array([True, False]),
    np.array([1, 2], np.uint8),
    np.array([0.5, -1.25], np.float16),
    np.array([b"ab", b"\xff\x00"], dtype=object),
    np.zeros((0, 4), np.float32),
])
def test_arrays_round_trip_through_typed_fields(array):
    proto = from_array(array)
    assert not proto.tensor_content
    back = to_array(proto)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tolist() == array.tolist()


def test_fewer_values_than_the_shape_pad_with_the_last_and_none_means_zeros():
    padded = to_array(tensor([1.0, 2.0], shape=(2, 2)))
    assert padded.tolist() == [[1.0, 2.0], [2.0, 2.0]]
    assert to_array(tensor([], shape=(2,))).tolist() == [0.0, 0.0]
    text = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    text.tensor_shape.dim.add().size = 2
    text.string_val.append(b"x")
    assert to_array(text).tolist() == [b"x", b"x"]


def test_str_outputs_are_written_as_utf8_bytes():
    proto = from_array(np.array(["é", "b"], dtype=object))
    assert proto.dtype == types_pb2.DT_STRING and list(proto.string_val) == [b"\xc3\xa9", b"b"]


def test_unreadable_tensors_say_why():
    with pytest.raises(TensorError, match="unknown rank"):
        to_array(tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape={"unknown_rank": True}))
    with pytest.raises(TensorError, match="DT_RESOURCE"):
        to_array(tensor_pb2.TensorProto(dtype=types_pb2.DT_RESOURCE))


# ------------------------------------------- TF Serving's own gRPC test cases
# Replayed from tensorflow_serving/model_servers/tensorflow_model_server_test.py
# against its test SavedModels (tests/data/tf_serving, see SOURCE.md there).

TF_SERVING_DATA = Path(__file__).parent / "data" / "tf_serving"


@pytest.fixture(scope="module", params=["saved_model_half_plus_two_cpu",
                                        "saved_model_half_plus_two_tf2_cpu"])
def half_plus_two(request):
    """TF Serving's half_plus_two (TF1 and TF2 exports) served as `default`, as its tests do."""
    with serve(TF_SERVING_DATA / request.param, name="default", port=0, grpc_port=0,
               poll_interval_s=3600) as server:
        client = Client(server.grpc_port)
        try:
            yield request.param, client
        finally:
            client.close()


def tf_serving_predict(client, name="default", batch_input=False,
                       signature="serving_default", specify_output=True):
    """`VerifyPredictRequest` of TF Serving's test base: x = 2.0, shape [1] or [1, 1]."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.model_spec.signature_name = signature
    req.inputs["x"].dtype = types_pb2.DT_FLOAT
    req.inputs["x"].float_val.append(2.0)
    req.inputs["x"].tensor_shape.dim.add().size = 1
    if batch_input:
        req.inputs["x"].tensor_shape.dim.add().size = 1
    if specify_output:
        req.output_filter.append("y")
    return client.predict.Predict(req, TIMEOUT_S)


@pytest.mark.parametrize("batch_input", [False, True])
def test_tf_serving_predict_case(half_plus_two, batch_input):
    folder, client = half_plus_two
    if batch_input and folder.endswith("_tf2_cpu"):
        # The TF2 export declares x of shape [1]: a [1, 1] tensor does not fit
        # its signature (TF Serving runs this case on the TF1 export only).
        code, details = rpc_error(tf_serving_predict, client, batch_input=True)
        assert code == INVALID and "x" in details
        return
    result = tf_serving_predict(client, batch_input=batch_input)
    assert "y" in result.outputs
    assert result.outputs["y"].dtype == types_pb2.DT_FLOAT
    assert len(result.outputs["y"].float_val) == 1
    assert result.outputs["y"].float_val[0] == 3.0
    assert (result.model_spec.name, result.model_spec.signature_name,
            result.model_spec.version.value) == ("default", "serving_default", 123)


def test_tf_serving_predict_case_without_output_filter_or_signature_name(half_plus_two):
    _, client = half_plus_two
    result = tf_serving_predict(client, signature="", specify_output=False)
    assert result.outputs["y"].float_val[0] == 3.0
    assert result.model_spec.signature_name == "serving_default"


def test_tf_serving_get_model_status_case(half_plus_two):
    _, client = half_plus_two
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "default"
    result = client.models.GetModelStatus(request, TIMEOUT_S)
    assert len(result.model_version_status) == 1
    assert result.model_version_status[0].version == 123
    assert result.model_version_status[0].status.error_code == 0


def test_tf_serving_get_model_metadata_case(half_plus_two):
    folder, client = half_plus_two
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "default"
    request.metadata_field.append("signature_def")
    result = client.predict.GetModelMetadata(request, TIMEOUT_S)
    assert result.model_spec.name == "default"
    assert result.model_spec.version.value == 123
    assert len(result.metadata) == 1 and "signature_def" in result.metadata
    if folder != "saved_model_half_plus_two_cpu":
        return
    # The map itself: TF Serving's expected metadata for this model, signature by signature.
    expected = json.loads((TF_SERVING_DATA / "half_plus_two_model_metadata.json").read_text())
    expected = expected["metadata"]["signature_def"]["signature_def"]
    sigs = get_model_metadata_pb2.SignatureDefMap()
    result.metadata["signature_def"].Unpack(sigs)
    got = json_format.MessageToDict(sigs, preserving_proto_field_name=True)["signature_def"]
    assert sorted(got) == sorted(expected)
    for name, sig in expected.items():
        assert got[name]["method_name"] == sig["method_name"]
        for side in ("inputs", "outputs"):
            assert {k: v["name"] for k, v in got[name][side].items()} == \
                {k: v["name"] for k, v in sig[side].items()}


def tf_serving_examples(request_class, signature):
    request = request_class()
    request.model_spec.name = "default"
    request.model_spec.signature_name = signature
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.extend([2.0])
    return request


def test_tf_serving_classify_case(half_plus_two):
    from tensorflow_serving.apis import classification_pb2

    _, client = half_plus_two
    result = client.predict.Classify(
        tf_serving_examples(classification_pb2.ClassificationRequest, "classify_x_to_y"),
        TIMEOUT_S)
    assert len(result.result.classifications) == 1
    assert len(result.result.classifications[0].classes) == 1
    assert result.result.classifications[0].classes[0].score == 3.0
    assert (result.model_spec.name, result.model_spec.signature_name,
            result.model_spec.version.value) == ("default", "classify_x_to_y", 123)


def test_tf_serving_regress_case(half_plus_two):
    from tensorflow_serving.apis import regression_pb2

    _, client = half_plus_two
    result = client.predict.Regress(
        tf_serving_examples(regression_pb2.RegressionRequest, "regress_x_to_y"), TIMEOUT_S)
    assert len(result.result.regressions) == 1
    assert result.result.regressions[0].value == 3.0
    assert (result.model_spec.name, result.model_spec.signature_name,
            result.model_spec.version.value) == ("default", "regress_x_to_y", 123)


def test_classify_with_a_predict_signature_is_an_invalid_argument(half_plus_two):
    from tensorflow_serving.apis import classification_pb2

    _, client = half_plus_two
    code, details = rpc_error(client.predict.Classify, tf_serving_examples(
        classification_pb2.ClassificationRequest, "nope"), TIMEOUT_S)
    assert code == INVALID and "No signature was found with the name: nope" in details


def test_tf_serving_half_plus_three_and_the_newest_of_two_versions():
    with serve(TF_SERVING_DATA / "saved_model_half_plus_three", name="half_plus_three",
               port=0, grpc_port=0, poll_interval_s=3600) as three, \
            serve(TF_SERVING_DATA / "saved_model_half_plus_two_2_versions", name="default",
                  port=0, grpc_port=0, poll_interval_s=3600) as two:
        client = Client(three.grpc_port)
        try:
            result = tf_serving_predict(client, name="half_plus_three")
            assert result.outputs["y"].float_val[0] == 4.0
            assert result.model_spec.version.value == 123
        finally:
            client.close()
        client = Client(two.grpc_port)
        try:
            assert tf_serving_predict(client).model_spec.version.value == 124
        finally:
            client.close()


def test_version_labels_and_pinned_versions_of_a_model_config_file(tmp_path):
    base = (TF_SERVING_DATA / "saved_model_half_plus_two_2_versions").resolve()
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "hp2" base_path: "{base}" '
        'model_platform: "tensorflow" model_version_policy { all {} } '
        'version_labels { key: "stable" value: 123 } '
        'version_labels { key: "canary" value: 124 } } }')
    with serve(None, model_config_file=config, port=0, grpc_port=0) as server:
        client = Client(server.grpc_port)
        try:
            def version_of(**spec):
                return tf_serving_predict_spec(client, "hp2", **spec).model_spec.version.value

            assert version_of(label="stable") == 123
            assert version_of(label="canary") == 124
            assert version_of(version=123) == 123
            assert version_of() == 124
            code, details = rpc_error(tf_serving_predict_spec, client, "hp2", label="nope")
            assert code == INVALID and "nope" in details  # as TF Serving
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = "hp2"
            assert [s.version for s in client.models.GetModelStatus(
                request, TIMEOUT_S).model_version_status] == [124, 123]
            request.model_spec.version_label = "stable"
            (status,) = client.models.GetModelStatus(request, TIMEOUT_S).model_version_status
            assert status.version == 123
        finally:
            client.close()


def tf_serving_predict_spec(client, name, version=None, label=None):
    """half_plus_two's Predict (x = 2.0) with a pinned version or a label; checks y = 3."""
    req = predict_request({"x": tensor([2.0], shape=(1,))}, name=name, version=version,
                          label=label)
    result = client.predict.Predict(req, TIMEOUT_S)
    assert result.outputs["y"].float_val[0] == 3.0
    return result


def test_string_tensors_reach_a_signature_that_parses_examples(half_plus_two):
    from tensorflow.core.example import example_pb2

    _, client = half_plus_two
    examples = []
    for x in (2.0, 4.0):
        example = example_pb2.Example()
        example.features.feature["x"].float_list.value.append(x)
        examples.append(example.SerializeToString())
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING)
    proto.tensor_shape.dim.add().size = 2
    proto.string_val.extend(examples)
    result = client.predict.Predict(
        predict_request({"inputs": proto}, name="default", signature="regress_x_to_y"),
        TIMEOUT_S)
    (out,) = result.outputs.values()
    assert to_array(out).ravel().tolist() == [3.0, 4.0]
    assert result.model_spec.signature_name == "regress_x_to_y"
