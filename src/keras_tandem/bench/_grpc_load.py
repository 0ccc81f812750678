"""gRPC load for `tandem bench http`: a closed-loop client in other processes, and its ceiling.

Owns:
- `run_grpc_load`: drives TF Serving's `PredictionService/Predict` with one
  request (serialized once, sent as raw bytes: the client spends no CPU on
  protobuf) from separate processes (`python -m keras_tandem.bench._grpc_load`),
  N calls in flight, spread over up to 8 HTTP/2 connections per process
  (channels with their own subchannel pool). Reports requests, latency
  percentiles and errors in `_loadgen`'s shape, so rows compare. A Python
  `grpc.aio` client tops out near what one core of Python can send, so
  `tandem bench http` measures it against `GrpcCeiling` in the same run.
- `GrpcCeiling`: a `grpc.aio` server on a thread of the bench's process, as
  `tandem serve`'s gRPC server runs, whose `Predict` parses the request
  (protobuf) and views each input's `tensor_content` as a NumPy array, and
  answers a canned response encoded once: no Predictor, no inference. Its rate is the most
  the gRPC stack and this client reach here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any

from keras_tandem.bench._loadgen import _parse_summary

PREDICT = "/tensorflow.serving.PredictionService/Predict"
_CHANNELS_PER_PROCESS = 8


def run_grpc_load(target: str, request: bytes, connections: int, duration_s: float,
                  processes: int = 1, timeout_s: float = 30.0) -> dict[str, Any]:
    """Sends `request` to `target`'s Predict from separate processes, closed loop.

    Args:
        target: `host:port`.
        request: a serialized `PredictRequest`.
        connections: calls in flight at once, over all processes.
        duration_s: how long to send.
        processes: client processes (each one event loop).
        timeout_s: the deadline of each call; a call past it is an error.

    Returns:
        `requests`, `duration_s`, `req_per_s`, `p50_ms`, `p99_ms`, `mean_ms`,
        `max_ms` and `errors`, as `_loadgen.run_load`.
    """
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (i < connections % processes)
              for i in range(processes)]
    with tempfile.NamedTemporaryFile("wb", suffix=".pb", delete=False) as f:
        f.write(request)
        request_file = f.name
    try:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "keras_tandem.bench._grpc_load", "--target", target,
             "--request-file", request_file, "--connections", str(n), "--duration",
             str(duration_s), "--timeout", str(timeout_s)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in shares]
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=duration_s + timeout_s + 120)
            outs.append(_parse_summary(stdout, stderr, "the gRPC load generator"))
    finally:
        os.unlink(request_file)
    latencies = sorted(v for o in outs for v in o.pop("latencies_ms"))
    duration = max(o["duration_s"] for o in outs)
    return {"requests": len(latencies), "duration_s": duration,
            "req_per_s": len(latencies) / duration if duration else 0.0,
            "p50_ms": _pct(latencies, 50), "p99_ms": _pct(latencies, 99),
            "mean_ms": sum(latencies) / len(latencies) if latencies else 0.0,
            "max_ms": latencies[-1] if latencies else 0.0,
            "errors": sum(o["errors"] for o in outs)}


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


class GrpcCeiling:
    """The no-inference gRPC server: parses Predict requests, answers a canned response.

    Args:
        response: the serialized `PredictResponse` every call gets.

    Attributes:
        target: `127.0.0.1:PORT`.
        parsed: requests parsed (and answered) so far.
    """

    def __init__(self, response: bytes):
        self._response = response
        self.parsed = 0
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="grpc-ceiling",
                                        daemon=True)
        self._thread.start()
        self.target = f"127.0.0.1:{ready.result(timeout=60)}"

    def _run(self, ready: Future) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            port = self._loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001 - re-raised by the constructor
            self._loop.close()
            ready.set_exception(e)
            return
        ready.set_result(port)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self) -> int:
        import grpc
        import numpy as np
        from tensorflow_serving.apis import predict_pb2

        async def predict(request: Any, context: Any) -> bytes:
            for proto in request.inputs.values():
                np.frombuffer(proto.tensor_content, np.uint8)
            self.parsed += 1
            return self._response

        handler = grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {
            "Predict": grpc.unary_unary_rpc_method_handler(
                predict, request_deserializer=predict_pb2.PredictRequest.FromString,
                response_serializer=None)})
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((handler,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def stop(self) -> None:
        """Stops the server and joins its thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(60)

    def __enter__(self) -> GrpcCeiling:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------ the client


async def _drive(target: str, request: bytes, connections: int, duration_s: float,
                 timeout_s: float) -> dict[str, Any]:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    channels = [grpc.aio.insecure_channel(target, options=options)
                for _ in range(min(connections, _CHANNELS_PER_PROCESS))]
    calls = [ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
             for ch in channels]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout_s)
    latencies: list[float] = []
    errors = [0]
    now = time.perf_counter
    start = now()
    stop_at = start + duration_s

    async def one(call: Any) -> None:
        while now() < stop_at:
            t0 = now()
            try:
                await call(request, timeout=timeout_s)
            except grpc.aio.AioRpcError:
                errors[0] += 1
                continue
            latencies.append((now() - t0) * 1e3)

    await asyncio.gather(*(one(calls[i % len(calls)]) for i in range(connections)))
    elapsed = now() - start
    for ch in channels:
        await ch.close()
    return {"latencies_ms": latencies, "duration_s": elapsed, "errors": errors[0]}


def main(argv: list[str] | None = None) -> int:
    """The client process: prints one `TANDEM_JSON {...}` line with every latency."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--request-file", required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    with open(a.request_file, "rb") as f:
        request = f.read()
    summary = asyncio.run(_drive(a.target, request, a.connections, a.duration, a.timeout))
    print("TANDEM_JSON " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
