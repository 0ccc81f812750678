"""Several models from a TF Serving model config file: policies, labels, reloads, routes.

The parser and the version policies are checked on their own; the rest runs
a real server (127.0.0.1, a free port) over tiny `.keras` models in
`tmp_path`, and waits for reloads by polling (`_poll.wait_until`).
"""

import os
import re
import threading

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from _http import cli_serve, request
from _models import mlp
from _poll import wait_until
from keras_tandem import PredictorClosed, serve
from keras_tandem.server._model_config import ConfigWatcher, parse_model_config
from keras_tandem.server._repository import (
    AVAILABLE,
    END,
    ServedModel,
    VersionPolicy,
    VersionWatcher,
)

X = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
OPTIONS = {"max_batch_size": 8}


def save(base, version, model):
    folder = base / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")


def ref(model):
    return keras.ops.convert_to_numpy(model(X, training=False))


def write_config(path, entries):
    """Writes a model config file whole (a reader never sees half of it)."""
    text = "model_config_list {\n" + "".join(
        f"  config {{\n    {entry}\n  }}\n" for entry in entries) + "}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def entry(name, base, extra=""):
    return f'name: "{name}" base_path: "{base}" model_platform: "tensorflow" {extra}'


def predict(url, path, x=X):
    return request(url, "POST", f"/v1/models/{path}:predict", {"instances": x.tolist()})


def states(url, name):
    _, _, doc = request(url, "GET", f"/v1/models/{name}")
    return {e["version"]: e["state"] for e in doc.get("model_version_status", [])}


# ------------------------------------------------------------------ parsing


def test_the_config_file_is_parsed_with_tf_servings_protos():
    specs = parse_model_config('''
        model_config_list {
          config { name: "a" base_path: "/m/a" model_platform: "tensorflow"
                   model_version_policy { specific { versions: 1 versions: 3 } }
                   version_labels { key: "stable" value: 1 }
                   version_labels { key: "canary" value: 3 } }
          config { name: "b" base_path: "rel/b"
                   model_version_policy { latest { num_versions: 2 } } }
          config { name: "c" base_path: "/m/c" model_version_policy { all {} } }
        }''')
    a, b, c = specs
    assert (a.name, str(a.base_path)) == ("a", "/m/a")
    assert a.policy == VersionPolicy("specific", versions=frozenset({1, 3}))
    assert dict(a.labels) == {"stable": 1, "canary": 3}
    assert b.policy == VersionPolicy("latest", num_versions=2) and str(b.base_path) == "rel/b"
    assert c.policy == VersionPolicy("all")
    default = parse_model_config('model_config_list { config { name: "d" base_path: "/d" } }')
    assert default[0].policy == VersionPolicy("latest", num_versions=1)


@pytest.mark.parametrize("text, words", [
    ('model_config_list {\n config { nam: "a" } }', ["models.config:2:", "nam"]),
    ('model_config_list { config { base_path: "/a" } }', ["no name"]),
    ('model_config_list { config { name: "a" } }', ["no base_path"]),
    ('model_config_list { config { name: "a" base_path: "/a" model_platform: "pytorch" } }',
     ["'pytorch'", "not supported"]),
    ('model_config_list { config { name: "a" base_path: "/a" } '
     'config { name: "a" base_path: "/b" } }', ["twice"]),
    ('model_config_list { config { name: "a" base_path: "/a" '
     'model_version_policy { specific { } } } }', ["names no version"]),
])
def test_a_bad_config_file_is_refused_saying_where_and_what(text, words):
    with pytest.raises(ValueError) as e:
        parse_model_config(text, "models.config")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_version_policies_pick_versions_like_tf_serving():
    versions = {1, 2, 5, 10}
    assert VersionPolicy().select(versions) == {10}
    assert VersionPolicy("latest", num_versions=2).select(versions) == {5, 10}
    assert VersionPolicy("all").select(versions) == versions
    assert VersionPolicy("specific", versions=frozenset({2, 7})).select(versions) == {2}


def test_a_policy_change_loads_and_unloads_versions(tmp_path):
    base = tmp_path / "m"
    models = {v: mlp(v) for v in (1, 2, 3)}
    for v, m in models.items():
        save(base, v, m)
    served = ServedModel("m", policy=VersionPolicy("all"))
    watcher = VersionWatcher(served, base, OPTIONS, poll_interval_s=3600)
    try:
        watcher.load_initial()
        assert served.loaded_versions == [3, 2, 1]
        for v, m in models.items():  # each version answers with its own model
            np.testing.assert_allclose(served.get(v).predictor.predict(X), ref(m),
                                       rtol=1e-5, atol=1e-6)
        served.set_labels({"stable": 1, "later": 7})  # 7: waits until it is available
        assert served.labels == {"stable": 1}
        first = served.get(1).predictor
        served.policy = VersionPolicy("specific", versions=frozenset({1}))
        watcher.load_initial()
        assert served.loaded_versions == [1] and served.get(1).predictor is first
        assert {e["version"]: e["state"] for e in served.status()} == {
            "3": END, "2": END, "1": AVAILABLE}
        assert served.current.version == 1  # the newest loaded answers unpinned requests
        save(base, 7, mlp(7))
        served.policy = VersionPolicy("latest", num_versions=1)
        watcher.load_initial()
        assert served.loaded_versions == [7] and served.labels == {"stable": 1, "later": 7}
    finally:
        served.close()


def test_latest_two_serves_the_two_newest_and_unloads_the_oldest_when_one_arrives(tmp_path):
    base = tmp_path / "m"
    for v in (1, 2):
        save(base, v, mlp(v))
    served = ServedModel("m", policy=VersionPolicy("latest", num_versions=2))
    watcher = VersionWatcher(served, base, OPTIONS, poll_interval_s=3600)
    try:
        watcher.load_initial()
        assert served.loaded_versions == [2, 1]
        oldest = served.get(1).predictor
        third = mlp(3)
        save(base, 3, third)
        watcher.poll_once()  # seen once: maybe still being written
        assert served.loaded_versions == [2, 1]
        watcher.poll_once()
        assert served.loaded_versions == [3, 2] and served.state_of(1) == END
        np.testing.assert_allclose(served.current.predictor.predict(X), ref(third),
                                   rtol=1e-5, atol=1e-6)
        with pytest.raises(PredictorClosed):  # the unloaded version's Predictor closed
            oldest.predict(X)
    finally:
        served.close()


def test_the_config_watcher_applies_a_change_once_and_ignores_a_broken_file(tmp_path, caplog):
    path = tmp_path / "models.config"
    write_config(path, [entry("a", "/a")])
    applied = []
    watcher = ConfigWatcher(path, 3600, applied.append, current=path.read_text())
    assert not watcher.check_once()  # unchanged since start
    write_config(path, [entry("a", "/a"), entry("b", "/b")])
    assert watcher.check_once() and [s.name for s in applied[-1]] == ["a", "b"]
    assert not watcher.check_once()
    path.write_text("model_config_list { config { name: ")
    assert not watcher.check_once() and len(applied) == 1
    assert "keeping the models as they are" in caplog.text


# ---------------------------------------------------------------- a server


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    models = {("a", 1): mlp(1), ("a", 2): mlp(2), ("b", 1): mlp(3), ("c", 4): mlp(4)}
    for (name, v), m in models.items():
        save(root / name, v, m)
    return root, {key: ref(m) for key, m in models.items()}


def test_two_models_with_policies_labels_metrics_and_reloads(bases):
    root, want = bases
    config = root / "models.config"
    write_config(config, [
        entry("a", root / "a", 'model_version_policy { all {} } '
                               'version_labels { key: "stable" value: 1 } '
                               'version_labels { key: "canary" value: 2 }'),
        entry("b", root / "b"),
    ])
    with serve(model_config_file=config, model_config_file_poll_wait_seconds=0.05, port=0,
               poll_interval_s=0.05, predictor_options=OPTIONS, grpc_port=0) as server:
        assert server.models == ["a", "b"] and server.name == "a"
        assert states(server.url, "a") == {"2": AVAILABLE, "1": AVAILABLE}
        for path, model, version in [("a", ("a", 2), "2"), ("a/versions/1", ("a", 1), "1"),
                                     ("a/labels/stable", ("a", 1), "1"),
                                     ("a/labels/canary", ("a", 2), "2"), ("b", ("b", 1), "1")]:
            status, headers, doc = predict(server.url, path)
            assert status == 200 and headers["X-Model-Version"] == version, (path, doc)
            np.testing.assert_allclose(doc["predictions"], want[model], rtol=1e-5, atol=1e-6)
        status, _, doc = request(server.url, "GET", "/v1/models/a/labels/stable")
        assert status == 200 and [e["version"] for e in doc["model_version_status"]] == ["1"]
        status, _, doc = request(server.url, "GET", "/v1/models/a/labels/canary/metadata")
        assert status == 200 and doc["model_spec"]["version"] == "2"
        # Unknown names, versions and labels: TF Serving's wording.
        status, _, doc = predict(server.url, "zz")
        assert status == 404 and doc["error"] == "Servable not found for request: Latest(zz)"
        status, _, doc = predict(server.url, "a/versions/7")
        assert status == 404 and doc["error"] == "Servable not found for request: Specific(a, 7)"
        status, _, doc = predict(server.url, "a/labels/nope")
        assert status == 400 and doc["error"] == "Unrecognized servable version label: nope"
        status, _, doc = request(server.url, "GET", "/v1/models/zz")
        assert status == 404 and doc["error"] == "Could not find any versions of model zz"

        # gRPC resolves through the same registry: labels by `version_label`.
        assert server.grpc_port
        _, _, doc = request(server.url, "GET", "/v1/models/a/metadata")
        (input_name,) = doc["metadata"]["signature_def"]["signature_def"]["serving_default"][
            "inputs"]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for label, key in (("stable", ("a", 1)), ("canary", ("a", 2))):
                req = predict_pb2.PredictRequest()
                req.model_spec.name, req.model_spec.version_label = "a", label
                req.inputs[input_name].CopyFrom(tf.make_tensor_proto(X))
                reply = stub.Predict(req, timeout=30)
                assert reply.model_spec.version.value == key[1]
                (out,) = reply.outputs.values()
                np.testing.assert_allclose(tf.make_ndarray(out), want[key], rtol=1e-5,
                                           atol=1e-6)
            req.model_spec.version_label = "nope"
            with pytest.raises(grpc.RpcError) as e:
                stub.Predict(req, timeout=30)
            assert "Unrecognized servable version label: nope" in e.value.details()

        # Per-model batcher metrics, at TF Serving's monitoring path too.
        status, _, text = request(server.url, "GET", "/monitoring/prometheus/metrics")
        assert status == 200
        for name in ("a", "b"):
            assert f'keras_tandem_queue_depth{{model="{name}"}}' in text
            assert f'keras_tandem_queue_wait_seconds_bucket{{le="+Inf",model="{name}"}}' in text
        count = _metric(text, "keras_tandem_queue_wait_seconds_count", "a")
        assert count >= 4  # four answered requests to a, plus warm-up probes
        assert _metric(text, "keras_tandem_batch_size_count", "b") >= 2
        assert _metric(text, "keras_tandem_http_requests_total", "a",
                       'code="200",endpoint="predict",') == 4

        # Reload: a drops version 1 and moves its label, c arrives, b is untouched
        # and answers every request meanwhile.
        stop, answers = threading.Event(), []

        def hammer():
            while not stop.is_set():
                answers.append(predict(server.url, "b")[0])

        client = threading.Thread(target=hammer)
        client.start()
        try:
            wait_until(lambda: len(answers) >= 3, 60, "b never answered")
            write_config(config, [
                entry("a", root / "a", 'version_labels { key: "stable" value: 2 }'),
                entry("b", root / "b"),
                entry("c", root / "c"),
            ])
            wait_until(lambda: states(server.url, "a").get("1") == END
                       and states(server.url, "c").get("4") == AVAILABLE, 60,
                       "the new config was never applied")
            status, headers, _ = predict(server.url, "a/labels/stable")
            assert status == 200 and headers["X-Model-Version"] == "2"
            assert predict(server.url, "a/versions/1")[0] == 404
            status, headers, doc = predict(server.url, "c")
            assert status == 200 and headers["X-Model-Version"] == "4"
            np.testing.assert_allclose(doc["predictions"], want[("c", 4)], rtol=1e-5, atol=1e-6)
            seen = len(answers)
            write_config(config, [entry("b", root / "b"), entry("c", root / "c")])
            wait_until(lambda: "a" not in server.models, 60, "a was never removed")
            status, _, doc = predict(server.url, "a")
            assert status == 404 and "Latest(a)" in doc["error"]
            wait_until(lambda: len(answers) > seen + 3, 60, "b stopped answering")
        finally:
            stop.set()
            client.join(60)
        assert answers and set(answers) == {200}
        _, _, text = request(server.url, "GET", "/metrics")
        assert 'keras_tandem_queue_depth{model="a"}' not in text  # a's series left with it
        assert _metric(text, "keras_tandem_queue_depth", "c") == 0


def _metric(text, name, model, labels=""):
    prefix = f"{name}{{{labels}model=\"{model}\"}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{prefix!r} not in the metrics")


def test_serve_needs_a_model_or_a_config_file_but_not_both(tmp_path):
    with pytest.raises(ValueError, match="Nothing to serve"):
        serve(port=0)
    config = tmp_path / "models.config"
    write_config(config, [entry("a", tmp_path / "a")])
    with pytest.raises(ValueError, match="not both"):
        serve(tmp_path / "a", name="a", model_config_file=config, port=0)
    with pytest.raises(ValueError, match="name="):
        serve(tmp_path / "a", port=0)
    config.write_text('model_config_list { config { name: "a" base_path: "/x" '
                      'model_platform: "onnx" } }')
    with pytest.raises(ValueError, match="onnx"):
        serve(model_config_file=config, port=0)


def test_tandem_serve_takes_a_model_config_file(bases):
    root, want = bases
    config = root / "cli.config"
    write_config(config, [entry("b", root / "b"), entry("c", root / "c")])
    with cli_serve(f"--model-config-file={config}", "--grpc-port=0") as cli:
        assert "'b', 'c'" in cli.lines[-1], cli.lines
        grpc_port = int(re.search(r"gRPC on port (\d+)", cli.lines[-1])[1])
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            req = get_model_status_pb2.GetModelStatusRequest()
            req.model_spec.name = "c"
            (status,) = stub.GetModelStatus(req, timeout=30).model_version_status
            assert status.version == 4
        for name, key in (("b", ("b", 1)), ("c", ("c", 4))):
            status, _, doc = predict(f"http://127.0.0.1:{cli.port}", name)
            assert status == 200
            np.testing.assert_allclose(doc["predictions"], want[key], rtol=1e-5, atol=1e-6)
    assert cli.proc.returncode == 0


@pytest.mark.parametrize("argv, words", [
    ([], "either MODEL or --model-config-file"),
    (["m.keras", "--model-config-file", "models.config"], "not both"),
    (["--model-config-file", "models.config", "--name", "x"], "--name does not apply"),
])
def test_tandem_serve_refuses_a_model_and_a_config_file_together_or_neither(argv, words, capsys):
    import argparse

    from keras_tandem.server import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(argv)) == 2
    assert words in capsys.readouterr().err
