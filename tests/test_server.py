"""The HTTP server: TF Serving's REST API over a real socket, errors, metrics, versions.

Every test talks to a server it started on 127.0.0.1 (a free port) with a
real HTTP client (`http.client`), and stops it.
"""

import http.client
import json
import os
import re
import socket
import threading
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from _gated import open_gated_model
from _http import cli_serve, read_reply, request
from _poll import wait_until
from keras_tandem import Predictor, serve
from keras_tandem.server import DEFAULT_MAX_BODY_BYTES, _repository

# ------------------------------------------------------------------ helpers


def mlp(seed=0, hidden=8):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="x")
    h = keras.layers.Dense(hidden, activation="relu")(x)
    return keras.Model(x, keras.layers.Dense(3)(h))


def two_in_two_out(seed=0):
    keras.utils.set_random_seed(seed)
    a = keras.Input((3,), name="a")
    b = keras.Input((2,), name="b")
    h = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    outputs = {"score": keras.layers.Dense(1)(h), "probs": keras.layers.Dense(3)(h)}
    return keras.Model({"a": a, "b": b}, outputs)


def ref(model, x):
    out = model(x, training=False)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, out)


def predict(url, body, name="m", version=None):
    path = f"/v1/models/{name}" + (f"/versions/{version}" if version else "") + ":predict"
    return request(url, "POST", path, body)


def states(url, name):
    _, _, doc = request(url, "GET", f"/v1/models/{name}")
    return {e["version"]: (e["state"], e["status"]["error_code"])
            for e in doc.get("model_version_status", [])}


def metric(text, name, **labels):
    """The value of one sample in Prometheus text, or None."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(got.get(k) == str(v) for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def single():
    model = mlp()
    predictor = Predictor(model, max_batch_size=32)
    server = serve(predictor, name="m", port=0)
    yield server, model, predictor
    server.stop()
    predictor.close()


@pytest.fixture(scope="module")
def multi():
    model = two_in_two_out()
    predictor = Predictor(model)
    server = serve(predictor, name="multi", port=0)
    yield server, model
    server.stop()
    predictor.close()


@pytest.fixture
def gated():
    model, gate = open_gated_model()
    predictor = Predictor(model, max_batch_size=1, queue_size=1, timeout_s=1.0)
    server = serve(predictor, name="g", port=0, retry_after_s=2)
    yield server, predictor, gate
    gate.set()
    server.stop()
    predictor.close()


# -------------------------------------------------------------------- tests


def test_row_format_answers_like_the_model_with_version_headers(single):
    server, model, _ = single
    x = np.random.default_rng(0).random((3, 4)).astype(np.float32)
    status, headers, doc = predict(server.url, {"instances": x.tolist()})
    assert status == 200, doc
    assert list(doc) == ["predictions"]
    np.testing.assert_allclose(doc["predictions"], ref(model, x), rtol=1e-5, atol=1e-6)
    assert headers["X-Model-Version"] == "0" and headers["X-Weight-Version"] == "0"
    # Integers are accepted for a float input, like the Predictor does.
    status, _, doc = predict(server.url, {"instances": [[1, 2, 3, 4]]})
    assert status == 200
    np.testing.assert_allclose(doc["predictions"], ref(model, np.array([[1, 2, 3, 4.0]])),
                               rtol=1e-5, atol=1e-6)


def test_columnar_format_batch_single_example_and_named(single):
    server, model, _ = single
    x = np.random.default_rng(1).random((2, 4)).astype(np.float32)
    status, _, doc = predict(server.url, {"inputs": x.tolist()})
    assert status == 200 and list(doc) == ["outputs"]
    np.testing.assert_allclose(doc["outputs"], ref(model, x), rtol=1e-5, atol=1e-6)
    status, _, doc = predict(server.url, {"inputs": {"x": x.tolist()}})
    assert status == 200
    np.testing.assert_allclose(doc["outputs"], ref(model, x), rtol=1e-5, atol=1e-6)
    status, _, doc = predict(server.url, {"inputs": x[0].tolist()})  # one example, no batch
    assert status == 200
    np.testing.assert_allclose(doc["outputs"], ref(model, x[:1])[0], rtol=1e-5, atol=1e-6)


def test_multi_input_named_and_multi_output(multi):
    server, model = multi
    rng = np.random.default_rng(2)
    a, b = rng.random((2, 3)).astype(np.float32), rng.random((2, 2)).astype(np.float32)
    want = ref(model, {"a": a, "b": b})
    rows = [{"a": a[i].tolist(), "b": b[i].tolist()} for i in range(2)]
    status, _, doc = predict(server.url, {"instances": rows}, name="multi")
    assert status == 200, doc
    assert [sorted(p) for p in doc["predictions"]] == [["probs", "score"]] * 2
    for i in range(2):
        np.testing.assert_allclose(doc["predictions"][i]["score"], want["score"][i], atol=1e-5)
        np.testing.assert_allclose(doc["predictions"][i]["probs"], want["probs"][i], atol=1e-5)
    status, _, doc = predict(server.url, {"inputs": {"a": a.tolist(), "b": b.tolist()}},
                             name="multi")
    assert status == 200, doc
    np.testing.assert_allclose(doc["outputs"]["score"], want["score"], atol=1e-5)
    np.testing.assert_allclose(doc["outputs"]["probs"], want["probs"], atol=1e-5)
    status, _, doc = predict(server.url, {"instances": [{"a": [1, 2, 3]}]}, name="multi")
    assert status == 400 and "b" in doc["error"]


def test_status_metadata_and_healthz(single, multi):
    server, _, _ = single
    status, _, doc = request(server.url, "GET", "/v1/models/m")
    assert status == 200
    assert doc == {"model_version_status": [
        {"version": "0", "state": "AVAILABLE", "status": {"error_code": "OK",
                                                          "error_message": ""}}]}
    status, _, doc = request(server.url, "GET", "/v1/models/m/versions/0")
    assert status == 200 and doc["model_version_status"][0]["state"] == "AVAILABLE"
    status, _, doc = request(server.url, "GET", "/v1/models/m/metadata")
    assert status == 200
    assert doc["model_spec"] == {"name": "m", "signature_name": "", "version": "0"}
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["x"]["tensor_shape"]["dim"]] == ["-1", "4"]
    (out,) = sig["outputs"].values()
    assert [d["size"] for d in out["tensor_shape"]["dim"]] == ["-1", "3"]
    status, _, doc = request(multi[0].url, "GET", "/v1/models/multi/metadata")
    sig = doc["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sorted(sig["inputs"]) == ["a", "b"] and sorted(sig["outputs"]) == ["probs", "score"]
    assert [d["size"] for d in sig["inputs"]["b"]["tensor_shape"]["dim"]] == ["-1", "2"]
    status, _, doc = request(server.url, "GET", "/healthz")
    assert status == 200 and doc["status"] == "ok"


def test_version_follows_update_weights_of_a_predictor_passed_in(single):
    server, model, predictor = single
    x = np.ones((1, 4), np.float32)
    other = mlp(seed=5)
    version = predictor.update_weights(other)
    try:
        status, headers, doc = predict(server.url, {"instances": x.tolist()})
        assert status == 200 and headers["X-Weight-Version"] == str(version)
        np.testing.assert_allclose(doc["predictions"], ref(other, x), rtol=1e-5, atol=1e-6)
        assert predict(server.url, {"instances": x.tolist()}, version=version)[0] == 200
        assert predict(server.url, {"instances": x.tolist()}, version=version + 7)[0] == 404
    finally:
        predictor.update_weights(model)


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "Malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"instances": [[0.0] * 4], "inputs": [[0.0] * 4]}, 400, "exactly one"),
    ({"examples": [[0.0] * 4]}, 400, "neither"),
    ({"instances": [[0.0] * 5]}, 400, "(4,)"),
    ({"instances": [["a", "b", "c", "d"]]}, 400, "string"),
    ({"instances": [0.0, 1.0, 2.0, 3.0]}, 400, "list of examples"),
    ({"instances": []}, 400, "non-empty"),
    ({"instances": [[0.0] * 4, [0.0] * 3]}, 400, "ragged"),
    ({"inputs": {"y": [[0.0] * 4]}}, 400, "'y'"),
    ({"instances": [[0.0] * 4], "signature_name": "other"}, 400, "signature_name"),
])
def test_bad_requests_get_400_with_the_reason(single, body, status, fragment):
    server, _, _ = single
    got, headers, doc = predict(server.url, body)
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    assert list(doc) == ["error"] and fragment in doc["error"], doc
    # ... and never affect the next request.
    assert predict(server.url, {"instances": [[0.0] * 4]})[0] == 200


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/models/nope:predict", 404),
    ("POST", "/v1/models/m/versions/99:predict", 404),
    ("POST", "/v1/models/m/versions/latest:predict", 404),
    ("GET", "/v1/models/nope", 404),
    ("GET", "/v1/models/m/versions/99", 404),
    ("GET", "/v1/models/nope/metadata", 404),
    ("GET", "/v2/whatever", 404),
    ("GET", "/v1/models/m:predict", 405),
])
def test_unknown_model_version_path_and_method(single, method, path, status):
    server, _, _ = single
    body = b'{"instances": [[0, 0, 0, 0]]}' if method == "POST" else None
    got, _, doc = request(server.url, method, path, body)
    assert got == status
    assert isinstance(doc, dict) and isinstance(doc["error"], str) and doc["error"]


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/models/m:predict", "POST"),
    ("HEAD", "/v1/models/m/versions/1:classify", "POST"),
    ("POST", "/v1/models/m/metadata", "GET,HEAD"),
    ("DELETE", "/healthz", "GET,HEAD"),
])
def test_a_wrong_method_gets_a_json_405_with_allow(single, method, path, allow):
    server, _, _ = single
    _, _, before = request(server.url, "GET", "/metrics")
    got, headers, body = request(server.url, method, path, b"{}" if method == "POST" else None,
                                 raw=True)
    assert got == 405 and headers["Allow"] == allow
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {"error": "Method Not Allowed"} if method != "HEAD" else not body
    _, _, after = request(server.url, "GET", "/metrics")
    counted = [metric(text, "keras_tandem_http_errors_total", kind="method_not_allowed") or 0
               for text in (before, after)]
    assert counted[1] == counted[0] + 1


def test_a_bug_in_a_handler_answers_a_json_500_and_is_counted(single, monkeypatch):
    from keras_tandem.server import _app

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    server, _, _ = single
    monkeypatch.setattr(_app, "metadata_doc", broken)
    got, headers, doc = request(server.url, "GET", "/v1/models/m/metadata")
    assert got == 500 and headers["Content-Type"].startswith("application/json")
    assert doc == {"error": "Internal error: RuntimeError: boom"}
    _, _, text = request(server.url, "GET", "/metrics")
    assert metric(text, "keras_tandem_http_errors_total", kind="internal") >= 1
    assert metric(text, "keras_tandem_http_requests_total", endpoint="other", code=500) >= 1


def test_oversize_body_gets_413_before_the_body_is_read(single):
    server, _, _ = single
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        # Headers only: a server that waited for the body would time out here.
        s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (DEFAULT_MAX_BODY_BYTES + 1))
        reply = read_reply(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"limit" in json.loads(body)["error"].encode()
    assert DEFAULT_MAX_BODY_BYTES == 64 * 2**20


def test_body_limit_is_configurable_and_holds_for_chunked_bodies():
    predictor = Predictor(mlp(), max_batch_size=8)
    with serve(predictor, name="m", port=0, max_body_bytes=1000) as server:
        big = {"instances": [[0.5] * 4] * 100}  # ~2 KB
        assert predict(server.url, big)[0] == 413
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        chunks = iter([json.dumps(big).encode()])
        conn.request("POST", "/v1/models/m:predict", body=chunks,
                     headers={"Transfer-Encoding": "chunked"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "error" in json.loads(r.read())
        conn.close()
        assert predict(server.url, {"instances": [[0.5] * 4]})[0] == 200
    predictor.close()


def test_overload_gets_503_with_retry_after_and_timeout_504_and_failure_500(gated):
    server, predictor, gate = gated
    x = np.zeros(3, np.float32)
    gate.clear()
    first = predictor.submit(x)  # the worker takes it and blocks
    assert wait_until(lambda: predictor.stats()["queue_depth"] == 0)
    second = predictor.submit(x)  # fills the queue (queue_size=1)
    status, headers, doc = predict(server.url, {"instances": [x.tolist()]}, name="g")
    assert status == 503
    assert headers["Retry-After"] == "2"
    assert "queue is full" in doc["error"]
    gate.set()
    first.result(10), second.result(10)
    # A stuck worker: the request gives up with 504 after the Predictor's timeout_s
    # (the gate would hold it for 20 s, and the client waits 30 s).
    gate.clear()
    status, _, doc = predict(server.url, {"instances": [x.tolist()]}, name="g")
    assert status == 504 and "error" in doc
    gate.set()
    # The forward pass raises: 500 for that request only.
    status, _, doc = predict(server.url, {"instances": [[666.0, 0.0, 0.0]]}, name="g")
    assert status == 500 and "666" in doc["error"]
    assert wait_until(lambda: predict(server.url, {"instances": [x.tolist()]},
                                      name="g")[0] == 200, 10)
    _, _, text = request(server.url, "GET", "/metrics")
    assert metric(text, "keras_tandem_http_errors_total", model="g", kind="overloaded") == 1
    assert metric(text, "keras_tandem_http_errors_total", model="g", kind="timeout") == 1
    assert metric(text, "keras_tandem_http_errors_total", model="g",
                  kind="prediction_failed") == 1


def test_metrics_count_requests_errors_batches_latency_queue_and_version():
    predictor = Predictor(mlp(), max_batch_size=8)
    with serve(predictor, name="m", port=0) as server:
        for _ in range(5):
            assert predict(server.url, {"instances": [[0.1] * 4, [0.2] * 4]})[0] == 200
        for _ in range(2):
            assert predict(server.url, {"instances": [[0.1] * 5]})[0] == 400
        assert predict(server.url, {"instances": [[0.1] * 4]}, name="zz")[0] == 404
        status, headers, text = request(server.url, "GET", "/metrics")
    predictor.close()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    requests = "keras_tandem_http_requests_total"
    assert metric(text, requests, model="m", endpoint="predict", code=200) == 5
    assert metric(text, requests, model="m", endpoint="predict", code=400) == 2
    assert metric(text, requests, model="m", endpoint="predict", code=404) == 1
    assert metric(text, "keras_tandem_http_errors_total", model="m", kind="invalid_input") == 2
    assert metric(text, "keras_tandem_http_errors_total", model="m", kind="not_found") == 1
    assert metric(text, "keras_tandem_http_request_duration_seconds_count", model="m") == 8
    assert metric(text, "keras_tandem_http_request_duration_seconds_bucket", model="m",
                  le="+Inf") == 8
    # 5 requests of 2 rows, plus the server's one-row warm-up probe.
    assert metric(text, "keras_tandem_batch_size_count", model="m") == 6
    assert metric(text, "keras_tandem_batch_size_sum", model="m") == 11
    assert metric(text, "keras_tandem_batch_size_bucket", model="m", le="2") == 6
    assert metric(text, "keras_tandem_batch_size_bucket", model="m", le="1") == 1
    assert metric(text, "keras_tandem_queue_depth", model="m") == 0
    assert metric(text, "keras_tandem_model_version", model="m") == 0
    assert metric(text, "keras_tandem_weight_version", model="m") == 0


# ---------------------------------------------------------------- versions


def archive_bytes(model, tmp_dir: Path) -> bytes:
    """The bytes of `model` saved as a .keras archive."""
    path = tmp_dir / "archive.keras"
    model.save(path)
    data = path.read_bytes()
    path.unlink()
    return data


class Clients:
    """Threads that predict in a loop over keep-alive connections and record answers."""

    def __init__(self, url, name, x, n=2):
        self.url, self.name, self.x = url, name, x
        self.stop = threading.Event()
        self.answers = [[] for _ in range(n)]
        self.failures = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i):
        host, port = self.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = json.dumps({"instances": self.x.tolist()}).encode()
        while not self.stop.is_set():
            try:
                conn.request("POST", f"/v1/models/{self.name}:predict", body=body,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                raw = r.read()
            except (OSError, http.client.HTTPException) as e:  # a dropped connection
                self.failures.append(("exception", repr(e)))
                conn.close()
                continue
            if r.status != 200:
                self.failures.append((r.status, raw))
                continue
            self.answers[i].append((int(r.getheader("X-Model-Version")),
                                    json.loads(raw)["predictions"]))
            time.sleep(0.002)
        conn.close()

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_new_versions_swap_in_without_a_failed_request(tmp_path, monkeypatch):
    base = tmp_path / "models" / "m"
    base.mkdir(parents=True)
    models = {1: mlp(seed=1), 2: mlp(seed=2), 3: mlp(seed=3, hidden=16)}  # 3: new architecture
    (base / "1").mkdir()
    models[1].save(base / "1" / "model.keras")
    gate = threading.Event()
    real_load = _repository.load_keras_model

    def gated_load(path):
        gate.wait(30)
        return real_load(path)

    monkeypatch.setattr(_repository, "load_keras_model", gated_load)
    polls = []
    real_poll = _repository.VersionWatcher.poll_once

    def counted_poll(self):
        real_poll(self)
        polls.append(1)

    monkeypatch.setattr(_repository.VersionWatcher, "poll_once", counted_poll)
    gate.set()
    x = np.random.default_rng(3).random((1, 4)).astype(np.float32)
    with serve(str(base), name="m", port=0, poll_interval_s=0.05,
               predictor_options={"max_batch_size": 8}) as server:
        assert server.version == 1
        clients = Clients(server.url, "m", x)
        try:
            # Version 2 arrives half-written: it must not be loaded yet.
            gate.clear()
            data = archive_bytes(models[2], tmp_path)
            (base / "2").mkdir()
            target = base / "2" / "model.keras"
            with open(target, "wb") as f:
                f.write(data[: len(data) // 2])
            seen = len(polls)
            wait_until(lambda: len(polls) >= seen + 3, 30, "the watcher stopped polling")
            assert states(server.url, "m") == {"1": ("AVAILABLE", "OK")}
            with open(target, "ab") as f:
                f.write(data[len(data) // 2:])
            # Complete now: LOADING while the load is held up, version 1 still answers.
            assert wait_until(lambda: states(server.url, "m").get("2") == ("LOADING", "OK"))
            assert states(server.url, "m")["1"] == ("AVAILABLE", "OK")
            assert predict(server.url, {"instances": x.tolist()})[1]["X-Model-Version"] == "1"
            gate.set()
            assert wait_until(lambda: server.version == 2)
            # The new version is AVAILABLE before the old one is unloaded (as TF
            # Serving's availability-preserving policy does): poll for END.
            assert wait_until(lambda: states(server.url, "m") == {
                "2": ("AVAILABLE", "OK"), "1": ("END", "OK")})
            # Version 3 has another architecture: a new Predictor takes over.
            (base / "3").mkdir()
            models[3].save(base / "3" / "model.keras")
            assert wait_until(lambda: server.version == 3)
            assert wait_until(lambda: len(clients.answers[0]) > 3 and
                              clients.answers[0][-1][0] == 3)
        finally:
            clients.join()
    assert clients.failures == []
    for answers in clients.answers:
        versions = [v for v, _ in answers]
        assert versions == sorted(versions)  # never back to an older version
        for v, pred in answers:
            np.testing.assert_allclose(pred, ref(models[v], x), rtol=1e-5, atol=1e-6)
    assert {1, 2, 3} <= {v for a in clients.answers for v, _ in a}


def test_corrupt_or_unsafe_versions_are_reported_and_the_old_one_keeps_serving(tmp_path):
    base = tmp_path / "m"
    (base / "1").mkdir(parents=True)
    model = mlp(seed=1)
    model.save(base / "1" / "model.keras")
    x = np.ones((1, 4), np.float32)
    with serve(base, name="m", port=0, poll_interval_s=0.05) as server:
        # 2: not a zip at all (old enough not to be "still being written").
        (base / "2").mkdir()
        (base / "2" / "model.keras").write_bytes(b"garbage" * 1000)
        os.utime(base / "2" / "model.keras", (time.time() - 60, time.time() - 60))
        # 3: a valid archive whose config is not a model.
        (base / "3").mkdir()
        with zipfile.ZipFile(base / "3" / "model.keras", "w") as z:
            z.writestr("config.json", '{"class_name": "NoSuchLayer", "config": {}}')
            z.writestr("metadata.json", "{}")
        # 4: a Lambda layer, which safe_mode refuses to deserialize.
        keras.utils.set_random_seed(0)
        unsafe = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2)])
        (base / "4").mkdir()
        unsafe.save(base / "4" / "model.keras")
        assert wait_until(lambda: all(states(server.url, "m").get(v, ("", ""))[1] == "UNKNOWN"
                                      for v in "234"))
        status, _, doc = request(server.url, "GET", "/v1/models/m")
        by_version = {e["version"]: e for e in doc["model_version_status"]}
        assert by_version["1"]["state"] == "AVAILABLE"
        assert by_version["2"]["state"] == "END"
        assert "not a complete .keras archive" in by_version["2"]["status"]["error_message"]
        assert "safe_mode" in by_version["4"]["status"]["error_message"]
        status, headers, doc = predict(server.url, {"instances": x.tolist()})
        assert status == 200 and headers["X-Model-Version"] == "1"
        np.testing.assert_allclose(doc["predictions"], ref(model, x), rtol=1e-5, atol=1e-6)
        _, _, text = request(server.url, "GET", "/metrics")
        assert metric(text, "keras_tandem_version_load_failures_total", model="m") == 3
        assert metric(text, "keras_tandem_model_version", model="m") == 1
        assert server.version == 1


def test_serve_a_keras_file_and_tandem_serve_cli(tmp_path):
    path = tmp_path / "clf.keras"
    model = mlp(seed=4)
    model.save(path)
    x = np.ones((1, 4), np.float32)
    with serve(path, name="clf", port=0) as server:
        status, headers, doc = predict(server.url, {"instances": x.tolist()}, name="clf")
        assert status == 200 and headers["X-Model-Version"] == "1"
        np.testing.assert_allclose(doc["predictions"], ref(model, x), rtol=1e-5, atol=1e-6)

    with cli_serve(path, "--max-batch-size", "4") as cli:
        assert f"127.0.0.1:{cli.port}/v1/models/clf" in cli.lines[-1], cli.lines
        status, _, doc = predict(f"http://127.0.0.1:{cli.port}", {"instances": x.tolist()},
                                 name="clf")
        assert status == 200
        np.testing.assert_allclose(doc["predictions"], ref(model, x), rtol=1e-5, atol=1e-6)
    assert cli.proc.returncode == 0


def test_a_request_racing_a_predictor_swap_goes_to_the_new_predictor():
    from keras_tandem.server._app import ModelApp
    from keras_tandem.server._repository import Servable, ServedModel, probe_outputs

    old_p, new_p = Predictor(mlp(seed=1), max_batch_size=4), Predictor(mlp(seed=2),
                                                                          max_batch_size=4)
    old = Servable(old_p, probe_outputs(old_p), version=1, owned=True)
    new = Servable(new_p, probe_outputs(new_p), version=2, owned=True)
    served = ServedModel("m", old)
    app = ModelApp(served, metrics=None, max_body_bytes=1000)
    served.install(new, replaced_version=1)  # closes the old Predictor
    x = np.ones((1, 4), np.float32)
    used, future = app._submit(old, x)  # the handler still held the old servable
    assert used is new
    _, weight_version = future.result(10)
    assert used.label(weight_version) == 2
    new_p.close()


def test_empty_base_directory_answers_503_until_a_first_version_loads(tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    x = np.ones((1, 4), np.float32)
    with serve(base, name="m", port=0, poll_interval_s=0.05) as server:
        assert server.version is None
        status, headers, doc = predict(server.url, {"instances": x.tolist()})
        assert status == 503 and headers["Retry-After"] == "1" and "no version" in doc["error"]
        assert request(server.url, "GET", "/healthz")[0] == 503
        assert request(server.url, "GET", "/v1/models/m")[0] == 404
        model = mlp(seed=6)
        (base / "1").mkdir()
        model.save(base / "1" / "model.keras")
        assert wait_until(lambda: server.version == 1)
        status, headers, doc = predict(server.url, {"instances": x.tolist()})
        assert status == 200 and headers["X-Model-Version"] == "1"
        np.testing.assert_allclose(doc["predictions"], ref(model, x), rtol=1e-5, atol=1e-6)
        assert request(server.url, "GET", "/healthz")[0] == 200


# ------------------------------------------------------- classify, regress


def _examples_saved_model(path):
    """A TF2 SavedModel with predict, classify (`scores`) and regress (`outputs`) signatures."""
    import tensorflow as tf

    class Examples(tf.Module):
        def __init__(self):
            self.w = tf.Variable(2.0)

        def _x(self, inputs):
            spec = {"x": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0])}
            return tf.io.parse_example(inputs, spec)["x"]

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def classify(self, inputs):
            x = self._x(inputs)
            return {"scores": tf.concat([x * self.w, -x], axis=1)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def regress(self, inputs):
            return {"outputs": self._x(inputs) * self.w + 1.0}

        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32)])
        def predict(self, x):
            return {"y": x * self.w}

    module = Examples()
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.predict, "classify": module.classify,
        "regress": module.regress})


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="SavedModels load on Keras' TensorFlow backend only")
def test_classify_and_regress_answer_tf_servings_results_by_version_and_label(tmp_path):
    _examples_saved_model(tmp_path / "ex" / "3")
    examples = {"examples": [{"x": 1.0}, {"x": 2.5}]}
    with serve(tmp_path / "ex", name="ex", port=0) as server:
        server._registry.get("ex").set_labels({"stable": 3})
        for which in ("", "/versions/3", "/labels/stable"):
            status, headers, doc = request(server.url, "POST", f"/v1/models/ex{which}:classify",
                                           {"signature_name": "classify", **examples})
            assert status == 200 and headers["X-Model-Version"] == "3", doc
            assert doc == {"results": [[["", 2.0], ["", -1.0]], [["", 5.0], ["", -2.5]]]}
        status, _, doc = request(server.url, "POST", "/v1/models/ex:regress",
                                 {"signature_name": "regress", **examples})
        assert status == 200 and doc == {"results": [3.0, 6.0]}
        # serving_default predicts: TF Serving's wording for the wrong method.
        status, _, doc = request(server.url, "POST", "/v1/models/ex:regress", examples)
        assert status == 400 and "Expected regression signature method_name" in doc["error"]
        status, _, doc = request(server.url, "POST", "/v1/models/ex/versions/9:classify",
                                 examples)
        assert status == 404 and doc["error"] == (
            "Servable not found for request: Specific(ex, 9)")
        _, _, text = request(server.url, "GET", "/metrics")
    assert metric(text, "keras_tandem_http_requests_total", model="ex", endpoint="classify",
                  code=200) == 3


def test_classify_on_a_keras_model_says_to_use_predict():
    with serve(mlp(), name="m", port=0) as server:
        status, _, doc = request(server.url, "POST", "/v1/models/m:classify",
                                 {"examples": [{"x": 1.0}]})
    assert status == 400 and ":predict" in doc["error"]


def test_metrics_are_also_at_tf_servings_monitoring_path_with_queue_waits():
    with serve(mlp(), name="m", port=0) as server:
        for _ in range(3):
            assert predict(server.url, {"instances": [[0.1] * 4]})[0] == 200
        status, headers, text = request(server.url, "GET", "/monitoring/prometheus/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    # 3 requests and the warm-up probe, each counted once in the queue-wait histogram.
    assert metric(text, "keras_tandem_queue_wait_seconds_count", model="m") == 4
    assert metric(text, "keras_tandem_queue_wait_seconds_bucket", model="m", le="+Inf") == 4
    assert metric(text, "keras_tandem_queue_wait_seconds_sum", model="m") > 0
    assert metric(text, "keras_tandem_predictor_requests_total", model="m") == 4


def test_queue_waits_are_counted_in_their_bucket():
    from keras_tandem.serving._stats import ServingStats
    from keras_tandem.serving.specs import QUEUE_WAIT_BOUNDS

    stats = ServingStats()
    waits = np.array([0.0, QUEUE_WAIT_BOUNDS[0], 0.003, 0.003, 99.0])
    start = 1000.0
    stats.record_batch(5, 5, done=start + 0.01, start=start, enqueued=list(start - waits))
    snap = stats.snapshot()
    counts = snap["queue_wait_counts"]
    assert len(counts) == len(QUEUE_WAIT_BOUNDS) + 1 and sum(counts) == 5
    assert counts[0] == 2  # at most the first bound, that bound included
    assert counts[QUEUE_WAIT_BOUNDS.index(0.005)] == 2  # 0.003 s: in (0.0025, 0.005]
    assert counts[-1] == 1  # beyond the last bound
    assert snap["queue_wait_seconds"] == pytest.approx(waits.sum())
