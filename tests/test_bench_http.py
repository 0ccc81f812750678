"""`tandem bench http` end to end, tiny: rows with CPU per answered request, the HTTP ceiling,
the gRPC rows and their ceiling, the SavedModel row."""

import json
import statistics
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

from _poll import wait_until
from keras_tandem.bench._grpc_load import GrpcCeiling, run_grpc_load
from keras_tandem.bench._http_ceiling import CeilingServer
from keras_tandem.bench.http import (
    CEILING,
    GRPC,
    GRPC_CEILING,
    RATIO_AT,
    SAVEDMODEL,
    _ratios,
    child_cpu_s,
)
from keras_tandem.serving.specs import ArraySpec


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny `tandem bench http --json` run, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("bench_http") / "http.json"
    proc = subprocess.run(
        [sys.executable, "-m", "keras_tandem.cli", "bench", "http", "--quick", "--skip-naive",
         "--connections", "4", str(RATIO_AT), "--duration", "0.3", "--loadgen", "python",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_bench_http_reports_cpu_per_answered_request(tiny_run):
    doc, _ = tiny_run
    rows = [r for r in doc["rows"] if r["technique"] == "keras-tandem"]
    assert [r["connections"] for r in rows] == [4, RATIO_AT]
    for row in rows:
        assert row["requests"] > 0 and row["errors"] == 0
        assert row["cpu_us"] > 0


def test_bench_http_reports_the_http_ceiling_and_the_ratio_to_it(tiny_run):
    doc, stdout = tiny_run
    ceiling = {r["connections"]: r for r in doc["rows"] if r["technique"] == CEILING}
    assert sorted(ceiling) == [4, RATIO_AT]
    for row in ceiling.values():
        assert row["requests"] > 0 and row["errors"] == 0 and row["req_per_s"] > 0
    tandem = next(r for r in doc["rows"]
                  if r["technique"] == "keras-tandem" and r["connections"] == RATIO_AT)
    ratios = doc["ratios"]
    assert ratios["ceiling_req_per_s"] == ceiling[RATIO_AT]["req_per_s"]
    # The ratio comes from paired slices (both servers up, alternating), not the two rows.
    slices = doc["http_vs_ceiling_slices"]
    assert len(slices) == 4 and all(r > 0 for r in slices)
    assert ratios["http_vs_ceiling"] == pytest.approx(statistics.median(slices))
    assert "http_vs_ceiling=" in stdout and "paired" in stdout
    # Without slices (no run at 64 connections), the rows' ratio stands in.
    assert _ratios(doc["rows"], [])["http_vs_ceiling"] == pytest.approx(
        tandem["req_per_s"] / ceiling[RATIO_AT]["req_per_s"])


def test_bench_http_reports_grpc_and_savedmodel_rows_beside_rest(tiny_run):
    doc, stdout = tiny_run
    by = {(r["technique"], r["connections"]): r for r in doc["rows"]}
    for technique in (GRPC, GRPC_CEILING, SAVEDMODEL):
        for c in (4, RATIO_AT):
            row = by[(technique, c)]
            assert row["requests"] > 0 and row["errors"] == 0 and row["cpu_us"] > 0
    # Served through a Predictor: batches were counted.
    assert by[(GRPC, RATIO_AT)]["mean_batch_size"] >= 1
    assert by[(SAVEDMODEL, RATIO_AT)]["mean_batch_size"] >= 1
    ratios = doc["ratios"]
    rest = by[("keras-tandem", RATIO_AT)]["req_per_s"]
    assert ratios["grpc_vs_rest"] == pytest.approx(by[(GRPC, RATIO_AT)]["req_per_s"] / rest)
    assert ratios["grpc_vs_ceiling"] == pytest.approx(
        by[(GRPC, RATIO_AT)]["req_per_s"] / by[(GRPC_CEILING, RATIO_AT)]["req_per_s"])
    assert ratios["savedmodel_vs_keras"] == pytest.approx(
        by[(SAVEDMODEL, RATIO_AT)]["req_per_s"] / rest)
    assert "grpc_vs_rest=" in stdout and "savedmodel_vs_keras=" in stdout


def test_grpc_load_counts_each_answered_call_of_every_client_process():
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "m"
    request.inputs["x"].dtype = 1  # DT_FLOAT
    request.inputs["x"].tensor_shape.dim.add().size = 2
    request.inputs["x"].float_val.extend([1.0, 2.0])
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "m"
    with GrpcCeiling(response.SerializeToString()) as ceiling:
        res = run_grpc_load(ceiling.target, request.SerializeToString(), 3, 0.3, processes=2)
        assert res["errors"] == 0 and res["requests"] > 0
        assert res["requests"] == ceiling.parsed
        assert res["req_per_s"] > 0 and 0 < res["p50_ms"] <= res["p99_ms"]
        # A request the ceiling cannot parse is an error, not an answer.
        bad = run_grpc_load(ceiling.target, b"\xff\xff", 1, 0.2)
        assert bad["requests"] == 0 and bad["errors"] > 0


def test_ceiling_server_parses_the_body_and_answers_a_canned_prediction():
    fields = [ArraySpec("x", (3,), np.dtype("float32"))]
    with CeilingServer("m", fields, [0.5, 0.25]) as server:
        ok = _post(f"{server.url}/v1/models/m:predict", b'{"instances": [[1, 2, 3], [4, 5, 6]]}')
        assert ok == (200, {"predictions": [[0.5, 0.25], [0.5, 0.25]]})
        # Not parsed, so not answered: the parser is really on the path.
        assert _post(f"{server.url}/v1/models/m:predict", b'{"instances": 7}')[0] == 500
        assert server.parsed == 1


def _post(url, body):
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def test_child_cpu_counts_the_cpu_a_child_process_burns():
    # The child spins until it has used 0.3 s of CPU, then waits for its stdin to close.
    spin = ("import sys, time\n"
            "while time.process_time() < 0.3: pass\n"
            "print('spun', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "spun"
        assert wait_until(lambda: child_cpu_s(child.pid) >= 0.25, 10)
    finally:
        child.stdin.close()
        child.wait(30)
