"""HTTP and gRPC serving: keras-tandem's server against a naive threaded model.predict server.

Owns the `tandem bench http` scenario: an MLP (784-256-256-10) served on
127.0.0.1 by `keras_tandem.serve` and, in the same run, by the naive way
(stdlib `ThreadingHTTPServer`, one thread per connection, `model.predict`
per request, as a threaded Flask app does it; `_naive_http`, in a child
process), and by the HTTP ceiling (`_http_ceiling`: the same aiohttp
framework and request body, parsed by the server's own parser, a canned
answer, no inference; on a thread of this process, as `tandem serve` is
here), each driven from a separate
load-generator process (`wrk` if installed, else a Python keep-alive
client; `_loadgen`) with single-example requests at several connection
counts. Beside them: `keras-tandem-grpc`, the same Predictor through the
server's gRPC API (`serve(..., grpc_port=0)`), driven by `_grpc_load`'s
client processes with one `PredictRequest` (the input as `tensor_content`,
as `tf.make_tensor_proto` writes it) and measured against `grpc-ceiling`
(the gRPC stack, the same client, a canned answer); and `savedmodel`, the
same MLP exported with `model.export()` and served from its directory over
REST. Reports requests/s, the serving process's CPU per answered request
(`cpu_us`: `time.process_time` for keras-tandem, served from this process;
`/proc/PID/stat` for the naive child), p50/p99 latency, mean batch size and
errors, and `http_vs_ceiling` (keras-tandem's req/s over the ceiling's at
64 connections), `grpc_vs_rest`, `grpc_vs_ceiling` and
`savedmodel_vs_keras` at the same count.

`http_vs_ceiling` comes from paired slices, not from the two rows: a
shared machine's speed drifts by tens of percent over the seconds between
rows, more than most changes move the ratio. With both servers up, the load
generator alternates between them in short slices (keras-tandem first in
one pair, the ceiling first in the next), and the ratio is the median of
the pairs' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from keras_tandem.bench._grpc_load import GrpcCeiling, run_grpc_load
from keras_tandem.bench._http_ceiling import CeilingServer
from keras_tandem.bench._loadgen import run_load, which_loadgen
from keras_tandem.bench._models import build_model
from keras_tandem.bench._report import console, print_ratios, print_table, write_json

CONNECTIONS = (1, 16, 64, 256)
RATIO_AT = 64
CEILING = "http-ceiling"
GRPC = "keras-tandem-grpc"
GRPC_CEILING = "grpc-ceiling"
SAVEDMODEL = "savedmodel"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this scenario's options to `parser`."""
    parser.add_argument("--quick", action="store_true",
                        help="short runs (well under a minute), naive server at 1 and 64 only")
    parser.add_argument("--json", metavar="PATH", help="write the rows and ratios to PATH")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measurement (default 8, quick 2)")
    parser.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS),
                        help="connection counts to measure (default 1 16 64 256)")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator: wrk if installed (auto), or the Python client")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--max-delay-ms", type=float, default=0.5)
    parser.add_argument("--skip-naive", action="store_true", help="skip the naive server")
    parser.add_argument("--skip-grpc", action="store_true",
                        help="skip the gRPC rows (keras-tandem-grpc, grpc-ceiling)")
    parser.add_argument("--skip-savedmodel", action="store_true",
                        help="skip the row of the MLP exported with model.export()")
    parser.add_argument("--grpc-processes", type=int, default=1,
                        help="gRPC client processes (default 1, as wrk -t1 for HTTP)")


class NaiveServer:
    """The baseline server (`_naive_http`) in a child process.

    Args:
        model_name: a model name from `_models` (`mlp`).
    """

    def __init__(self, model_name: str):
        cmd = [sys.executable, "-m", "keras_tandem.bench._naive_http", model_name]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True)
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the naive server did not start (printed {line!r})")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def cpu_s(self) -> float:
        """The child's CPU time so far (user + system, all its threads), in seconds."""
        return child_cpu_s(self._proc.pid)

    def stop(self) -> None:
        """Closes its stdin (it exits) and waits for it."""
        try:
            self._proc.stdin.close()
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def child_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from `/proc/PID/stat`."""
    with open(f"/proc/{pid}/stat") as f:
        # Fields after the command name, which may hold spaces: utime, stime are 14 and 15.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------- the run


def _warm(url: str, body: bytes) -> None:
    import urllib.request

    for _ in range(3):
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()


def _measure(technique: str, tool: str, url: str, body: bytes, connections: int,
             duration_s: float, predictor: Any = None, cpu_s: Any = time.process_time,
             load: Any = None) -> dict[str, Any]:
    """One row: `load(connections, duration_s)` (default: `run_load` of `body` to `url`)."""
    before = predictor.stats() if predictor is not None else None
    cpu = cpu_s()
    if load is None:
        res = run_load(tool, url, body, connections, duration_s)
    else:
        res = load(connections, duration_s)
    cpu = cpu_s() - cpu
    answered = res["requests"] - res["errors"]
    row = {"technique": technique, "connections": connections,
           "req_per_s": res["req_per_s"],
           "cpu_us": cpu / answered * 1e6 if answered > 0 else None,
           "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
           "requests": res["requests"], "errors": res["errors"], "mean_batch_size": None}
    if predictor is not None:
        after = predictor.stats()
        batches = after["batches"] - before["batches"]
        rows = after["mean_batch_size"] * after["batches"] - \
            before["mean_batch_size"] * before["batches"]
        row["mean_batch_size"] = rows / batches if batches else 0.0
    console.print(f"  {technique:>17} c={connections:<4} {row['req_per_s']:9.1f} req/s  "
                  f"cpu {row['cpu_us'] or 0:7.1f} us/req  "
                  f"p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
                  f"errors {row['errors']}")
    return row


def run(args: argparse.Namespace) -> int:
    """Runs the scenario; returns 0, or 1 if the keras-tandem server had errors."""
    import importlib.util

    import keras

    import keras_tandem
    from keras_tandem import Predictor

    # gRPC needs TensorFlow installed (its protos); a SavedModel, Keras' TensorFlow backend.
    if not args.skip_grpc and importlib.util.find_spec("tensorflow") is None:
        console.print("  gRPC rows left out: they need TensorFlow installed")
        args.skip_grpc = True
    if not args.skip_savedmodel and keras.backend.backend() != "tensorflow":
        console.print("  savedmodel row left out: SavedModels need the TensorFlow backend")
        args.skip_savedmodel = True

    duration = args.duration or (2.0 if args.quick else 8.0)
    warm_s = 0.5 if args.quick else 2.0
    levels = sorted(set(args.connections))
    naive_levels = [c for c in levels if c in (1, RATIO_AT)] if args.quick else levels
    tool = which_loadgen(args.loadgen)
    console.print(f"load generator: {tool} (separate process); {duration:g} s per point")

    model = build_model("mlp")
    rng = np.random.default_rng(0)
    example = np.round(rng.random(784), 4).tolist()
    body = json.dumps({"instances": [example]}).encode()

    rows: list[dict[str, Any]] = []
    paired: list[float] = []
    predictor = Predictor(model, max_batch_size=args.max_batch_size,
                          max_delay_ms=args.max_delay_ms)
    fields = predictor.inputs
    canned = [0.0] * int(np.prod(predictor.outputs[0].shape))
    try:
        with keras_tandem.serve(predictor, name="mlp", port=0) as server:
            url = f"{server.url}/v1/models/mlp:predict"
            _warm(url, body)
            for c in levels:
                run_load(tool, url, body, c, warm_s)
                rows.append(_measure("keras-tandem", tool, url, body, c, duration, predictor))
            if RATIO_AT in levels:
                with CeilingServer("mlp", fields, canned) as ceiling:
                    ceiling_url = f"{ceiling.url}/v1/models/mlp:predict"
                    _warm(ceiling_url, body)
                    paired = _paired_slices(tool, url, ceiling_url, body, RATIO_AT,
                                            pairs=4 if args.quick else 6,
                                            slice_s=min(2.0, duration / 2))
        if not args.skip_grpc:
            request, response = _grpc_messages(predictor, example)
            with keras_tandem.serve(predictor, name="mlp", port=0, grpc_port=0) as server:
                target = f"127.0.0.1:{server.grpc_port}"
                rows += _grpc_rows(GRPC, target, request, levels, duration, warm_s,
                                   args.grpc_processes, predictor)
    finally:
        predictor.close()

    if not args.skip_grpc:
        with GrpcCeiling(response) as ceiling:
            rows += _grpc_rows(GRPC_CEILING, ceiling.target, request, levels, duration, warm_s,
                               args.grpc_processes)

    with CeilingServer("mlp", fields, canned) as ceiling:
        url = f"{ceiling.url}/v1/models/mlp:predict"
        _warm(url, body)
        for c in levels:
            run_load(tool, url, body, c, warm_s)
            rows.append(_measure(CEILING, tool, url, body, c, duration))

    if not args.skip_savedmodel:
        rows += _savedmodel_rows(model, tool, body, levels, duration, warm_s, args)

    if not args.skip_naive:
        naive = NaiveServer("mlp")
        try:
            _warm(naive.url, body)
            for c in naive_levels:
                rows.append(_measure("naive", tool, naive.url, body, c,
                                     max(duration, 4.0) if c > 1 else duration,
                                     cpu_s=naive.cpu_s))
        finally:
            naive.stop()

    ratios = _ratios(rows, paired)
    columns = ["technique", "connections", "req_per_s", "cpu_us", "p50_ms", "p99_ms",
               "mean_batch_size", "requests", "errors"]
    print_table("HTTP and gRPC serving, single-example requests (MLP 784-256-256-10)", rows,
                columns)
    print(f"load_generator={tool}", flush=True)
    print_ratios(ratios)
    if args.json:
        config = {"duration_s": duration, "connections": levels, "naive_connections":
                  naive_levels, "max_batch_size": args.max_batch_size,
                  "max_delay_ms": args.max_delay_ms, "quick": args.quick,
                  "grpc_processes": args.grpc_processes}
        write_json(args.json, "http", config, rows, ratios, load_generator=tool,
                   http_vs_ceiling_slices=paired)
    tandem_errors = sum(r["errors"] for r in rows
                        if r["technique"] in ("keras-tandem", GRPC, SAVEDMODEL))
    return 1 if tandem_errors else 0


def _paired_slices(tool: str, url: str, ceiling_url: str, body: bytes, connections: int,
                   pairs: int, slice_s: float) -> list[float]:
    """keras-tandem's req/s over the ceiling's, per pair of back-to-back slices.

    Pairs alternate which server goes first, so a drift within a pair
    favours neither.
    """
    ratios = []
    for i in range(pairs):
        order = (url, ceiling_url) if i % 2 == 0 else (ceiling_url, url)
        rate = {u: run_load(tool, u, body, connections, slice_s)["req_per_s"] for u in order}
        if rate[ceiling_url]:
            ratios.append(rate[url] / rate[ceiling_url])
    console.print(f"  http_vs_ceiling in {len(ratios)} paired {slice_s:g} s slices at "
                  f"c={connections}: " + " ".join(f"{r:.3f}" for r in ratios))
    return ratios


def _grpc_messages(predictor: Any, example: list[float]) -> tuple[bytes, bytes]:
    """The serialized Predict request of one example, and a canned response for the ceiling.

    The example travels in `tensor_content`, as `tf.make_tensor_proto` writes
    a NumPy array; the response holds `float_val`, as the server answers.
    """
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mlp"
    x = np.asarray([example], np.float32)
    proto = request.inputs[predictor.inputs[0].name]
    proto.dtype = types_pb2.DT_FLOAT
    for d in x.shape:
        proto.tensor_shape.dim.add(size=d)
    proto.tensor_content = x.tobytes()
    response = predict_pb2.PredictResponse()
    response.model_spec.name = "mlp"
    response.model_spec.version.value = 1
    response.model_spec.signature_name = "serving_default"
    out = response.outputs["output_0"]
    out.dtype = types_pb2.DT_FLOAT
    shape = (1, *predictor.outputs[0].shape)
    for d in shape:
        out.tensor_shape.dim.add(size=d)
    out.float_val.extend([0.0] * int(np.prod(shape)))
    return request.SerializeToString(), response.SerializeToString()


def _grpc_rows(technique: str, target: str, request: bytes, levels: list[int],
               duration: float, warm_s: float, processes: int,
               predictor: Any = None) -> list[dict[str, Any]]:
    def load(c: int, seconds: float) -> dict[str, Any]:
        return run_grpc_load(target, request, c, seconds, processes)

    rows = []
    for c in levels:
        load(c, warm_s)
        rows.append(_measure(technique, f"grpc.aio x{processes}", target, request, c, duration,
                             predictor, load=load))
    return rows


def _savedmodel_rows(model: Any, tool: str, body: bytes, levels: list[int], duration: float,
                     warm_s: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The MLP exported with `model.export()`, served from its directory over REST."""
    import tempfile

    import keras_tandem

    rows = []
    with tempfile.TemporaryDirectory() as base:
        model.export(os.path.join(base, "1"), verbose=False)
        options = {"max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms}
        with keras_tandem.serve(base, name="mlp", port=0, predictor_options=options) as server:
            url = f"{server.url}/v1/models/mlp:predict"
            _warm(url, body)
            for c in levels:
                run_load(tool, url, body, c, warm_s)
                rows.append(_measure(SAVEDMODEL, tool, url, body, c, duration,
                                     server.predictor))
    return rows


def _ratios(rows: list[dict[str, Any]],
            paired: list[float] | None = None) -> dict[str, float | None]:
    """The ratio lines; `http_vs_ceiling` from `paired` slices where there are some."""

    def at(technique: str, c: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["technique"] == technique
                     and r["connections"] == c), None)

    t, n = at("keras-tandem", RATIO_AT), at("naive", RATIO_AT)
    h = at(CEILING, RATIO_AT)
    ratios: dict[str, float | None] = {
        "req_per_s": t["req_per_s"] if t else None,
        "p50_ms": t["p50_ms"] if t else None,
        "p99_ms": t["p99_ms"] if t else None,
        "mean_batch_size": t["mean_batch_size"] if t else None,
        "cpu_us": t["cpu_us"] if t else None,
        "naive_req_per_s": n["req_per_s"] if n else None,
        "naive_p99_ms": n["p99_ms"] if n else None,
        "throughput_vs_naive": t["req_per_s"] / n["req_per_s"]
        if t and n and n["req_per_s"] else None,
        "p99_vs_naive": t["p99_ms"] / n["p99_ms"] if t and n and n["p99_ms"] else None,
        "ceiling_req_per_s": h["req_per_s"] if h else None,
        "ceiling_p99_ms": h["p99_ms"] if h else None,
        "http_vs_ceiling": statistics.median(paired) if paired else (
            t["req_per_s"] / h["req_per_s"] if t and h and h["req_per_s"] else None),
        "errors": float(sum(r["errors"] for r in rows if r["technique"] == "keras-tandem")),
    }
    g, gc, sm = at(GRPC, RATIO_AT), at(GRPC_CEILING, RATIO_AT), at(SAVEDMODEL, RATIO_AT)

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
        return a["req_per_s"] / b["req_per_s"] if a and b and b["req_per_s"] else None

    ratios.update({
        "grpc_req_per_s": g["req_per_s"] if g else None,
        "grpc_p99_ms": g["p99_ms"] if g else None,
        "grpc_cpu_us": g["cpu_us"] if g else None,
        "grpc_mean_batch_size": g["mean_batch_size"] if g else None,
        "grpc_vs_rest": ratio(g, t),
        "grpc_ceiling_req_per_s": gc["req_per_s"] if gc else None,
        "grpc_vs_ceiling": ratio(g, gc),
        "savedmodel_req_per_s": sm["req_per_s"] if sm else None,
        "savedmodel_vs_keras": ratio(sm, t),
        "grpc_errors": float(sum(r["errors"] for r in rows if r["technique"] == GRPC)),
        "savedmodel_errors": float(sum(r["errors"] for r in rows
                                       if r["technique"] == SAVEDMODEL)),
    })
    return ratios
