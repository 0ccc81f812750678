"""TensorFlow Serving's gRPC API: `PredictionService` and `ModelService`.

Owns the gRPC front end: a `grpc.aio` server on its own thread and event
loop (`GrpcServer`), serving the generated servicers of the
`tensorflow-serving-api` package (`Predict`, `Classify`, `Regress`,
`GetModelMetadata`; `GetModelStatus`), TF Serving's status codes and
wording, and the client's deadline. Which servable answers comes from a
`ModelLookup` (`_lookup`), the same one REST uses; tensors become arrays in
`_tensor_proto`; `tf.Example` requests become arrays, and answers
classifications or regressions, in `_examples`. No prediction logic lives
here: every request is queued on the servable's `Predictor` with
`submit(x, loop=...)`, so gRPC and REST requests share batches.

Why `grpc.aio` rather than grpcio's thread-pool server: a thread-pool server
parks one thread per request in flight and wakes each one for its answer;
on the event loop the Predictor's loop bridge wakes the loop once per batch
and resolves all of that batch's requests, as it does for the REST server.

Status codes, as TF Serving's: NOT_FOUND for an unknown model, version or
label ("Servable not found for request: ..."); FAILED_PRECONDITION for an
unknown signature in Predict (TF Serving's "Serving signature key ... not
found."), INVALID_ARGUMENT in Classify and Regress; INVALID_ARGUMENT for
missing, extra or malformed inputs, a wrong dtype or shape, an unknown
output in `output_filter`; RESOURCE_EXHAUSTED when the Predictor's queue is
full (and, from grpcio, for a message over `max_message_bytes`);
DEADLINE_EXCEEDED past the client's deadline or the Predictor's timeout;
UNAVAILABLE while a model has nothing loaded or its Predictor is closing;
INTERNAL when the forward pass failed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from keras_tandem.errors import InvalidInputError, Overloaded, PredictionFailed, PredictorClosed
from keras_tandem.server._limits import RateLimitedLog
from keras_tandem.server._lookup import ModelLookup, ServableNotFound, UnknownLabel
from keras_tandem.server._protocol import metadata_doc
from keras_tandem.server._savedmodel import DEFAULT_SIGNATURE
from keras_tandem.server._tensor_proto import TensorError, dtype_name, enum_of, from_array, to_array

log = logging.getLogger("keras_tandem.server")
_now = time.perf_counter
_Code = grpc.StatusCode

# As REST's `max_body_bytes` (server._serve.DEFAULT_MAX_BODY_BYTES).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_SIGNATURE_DEF = "signature_def"


class _Abort(Exception):
    """An RPC error answer: status code, message, metric kind."""

    def __init__(self, code: grpc.StatusCode, message: str, kind: str):
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind


# The HTTP status of each gRPC code (google.rpc.Code's mapping), as metrics count calls.
_HTTP_STATUS = {
    _Code.OK: 200, _Code.CANCELLED: 499, _Code.UNKNOWN: 500, _Code.INVALID_ARGUMENT: 400,
    _Code.DEADLINE_EXCEEDED: 504, _Code.NOT_FOUND: 404, _Code.ALREADY_EXISTS: 409,
    _Code.PERMISSION_DENIED: 403, _Code.UNAUTHENTICATED: 401, _Code.RESOURCE_EXHAUSTED: 429,
    _Code.FAILED_PRECONDITION: 400, _Code.ABORTED: 409, _Code.OUT_OF_RANGE: 400,
    _Code.UNIMPLEMENTED: 501, _Code.INTERNAL: 500, _Code.UNAVAILABLE: 503,
    _Code.DATA_LOSS: 500,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status equivalent to a gRPC status code (google.rpc.Code's mapping)."""
    return _HTTP_STATUS.get(code, 500)


class GrpcServer:
    """TF Serving's gRPC services over a `ModelLookup`, on a thread of their own.

    Args:
        lookup: finds the servable a request names (`SingleModel`, or the
            server's model registry).
        host: the address to listen on (`127.0.0.1`, `0.0.0.0`, `::`).
        port: the port; 0 picks a free one (`start()` returns it).
        observe: `observe(endpoint, code, seconds, error_kind, model=name)`
            for each answered call (`ServerMetrics.observe`), with endpoints
            `grpc_predict`, `grpc_classify`, `grpc_regress`, `grpc_metadata`,
            `grpc_status`, and the HTTP status equivalent to the gRPC code
            (`http_status`: 200, 400, 404, 429, 499, 503, 504, ...);
            `seconds` for the inference calls only.
        max_message_bytes: the largest request or answer message; grpcio
            answers RESOURCE_EXHAUSTED beyond it.
        logs: where unexpected errors are logged (rate-limited).
    """

    def __init__(self, lookup: ModelLookup, host: str, port: int, *,
                 observe: Callable[..., None] | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 logs: RateLimitedLog | None = None):
        self.lookup = lookup
        self.host = host
        self.port = int(port)
        self.max_message_bytes = int(max_message_bytes)
        self._observe = observe
        self.logs = logs or RateLimitedLog(log)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def start(self) -> int:
        """Starts listening; returns the bound port.

        Raises:
            OSError: the address could not be bound.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("this GrpcServer was already started")
            ready: Future = Future()
            self._thread = threading.Thread(target=self._run, args=(ready,),
                                            name="keras-tandem-grpc", daemon=True)
            self._thread.start()
        try:
            self.port = ready.result()
        except BaseException:
            self._thread.join()
            raise
        return self.port

    def _run(self, ready: Future) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start_server())
        except BaseException as e:  # noqa: BLE001 - re-raised in start()
            loop.close()
            ready.set_exception(e)
            return
        ready.set_result(self.port)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _start_server(self) -> None:
        limit = self.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),  # a taken port fails here, not silently shared
        ])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionService(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self), server)
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") \
            else self.host
        try:
            bound = server.add_insecure_port(f"{host}:{self.port}")
        except RuntimeError as e:  # grpcio raises on a port it cannot bind
            raise OSError(f"gRPC cannot listen on {host}:{self.port}: {e}") from None
        if not bound:
            raise OSError(f"gRPC cannot listen on {host}:{self.port} (in use?): pass another "
                          "port, or 0 for a free one.")
        await server.start()
        self._server, self.port = server, bound

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops accepting calls, lets calls in flight finish for `grace_s`, joins the thread.

        Idempotent. The Predictors are not closed: whoever owns them does.
        """
        with self._lock:
            if self._stopped or self._thread is None:
                self._stopped = True
                return
            self._stopped = True
        loop, server = self._loop, self._server
        if loop is not None and server is not None and not loop.is_closed():
            done = asyncio.run_coroutine_threadsafe(server.stop(grace_s), loop)
            try:
                done.result(grace_s + 30.0)
            except Exception:  # stopping anyway
                log.warning("gRPC server did not stop cleanly", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(grace_s + 30.0)

    def __enter__(self) -> GrpcServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # ------------------------------------------------------------ helpers

    def observe(self, endpoint: str, code: grpc.StatusCode, seconds: float | None = None,
                error_kind: str | None = None, model: str | None = None) -> None:
        """Counts one answered call, if metrics were given."""
        if self._observe is not None:
            try:
                self._observe(endpoint, http_status(code), seconds, error_kind, model=model)
            except Exception:  # metrics must never fail a call
                self.logs.log("grpc-metrics", logging.ERROR, "counting a gRPC call failed",
                              exc_info=True)

    async def answer(self, endpoint: str, context: grpc.aio.ServicerContext,
                     handler: Callable[[], Any], model: str | None = None,
                     timed: bool = False) -> Any:
        """Runs `handler()` (a coroutine function) and turns its errors into statuses.

        Args:
            endpoint: the metrics' endpoint name.
            context: the call's context.
            handler: makes the response; raises `_Abort` for an error status.
            model: the model the request named, for metrics.
            timed: whether to report the call's latency (inference calls).
        """
        t0 = _now()
        try:
            response = await handler()
        except _Abort as e:
            error: _Abort | None = e
        except asyncio.CancelledError:  # the client left or its deadline passed
            self.observe(endpoint, _Code.CANCELLED, _now() - t0 if timed else None,
                         "client_closed", model)
            raise
        except Exception as e:  # a bug answers INTERNAL, not a dropped call
            self.logs.log(f"grpc-{endpoint}", logging.ERROR, "gRPC %s failed unexpectedly",
                          endpoint, exc_info=True)
            error = _Abort(_Code.INTERNAL, f"Internal error: {type(e).__name__}: {e}",
                           "internal")
        else:
            self.observe(endpoint, _Code.OK, _now() - t0 if timed else None, model=model)
            return response
        self.observe(endpoint, error.code, _now() - t0 if timed else None, error.kind, model)
        await context.abort(error.code, error.message)

    def resolve(self, spec: Any) -> tuple[Any, Any, int | None, str | None]:
        """`(served, servable, version, label)` for a request's `model_spec`."""
        choice = spec.WhichOneof("version_choice")
        version = spec.version.value if choice == "version" else None
        label = spec.version_label if choice == "version_label" else None
        try:
            served, servable = self.lookup.resolve(spec.name, version, label or None)
        except ServableNotFound as e:
            if e.unavailable:
                raise _Abort(_Code.UNAVAILABLE, e.message, "unavailable") from None
            if isinstance(e, UnknownLabel):  # TF Serving: INVALID_ARGUMENT, not NOT_FOUND
                raise _Abort(_Code.INVALID_ARGUMENT, e.message, "invalid_input") from None
            raise _Abort(_Code.NOT_FOUND, e.message, "not_found") from None
        return served, servable, version, label or None

    async def run(self, spec: Any, servable: Any, target: Any, signature: str, x: Any,
                  context: grpc.aio.ServicerContext) -> tuple[Any, Any, int]:
        """Queues `x` on `target`'s Predictor and awaits its answer within the deadline.

        Returns:
            `(servable, outputs, model version)`: the servable that answered
            (a newer one if `servable` was swapped out meanwhile).
        """
        loop = asyncio.get_running_loop()
        try:
            try:
                answer = target.predictor.submit(x, return_version=True, loop=loop)
            except PredictorClosed:
                # Swapped out under us: the servable now answering takes it.
                _, current, _, _ = self.resolve(spec)
                retry = current.for_signature(signature)
                if retry is None or retry is target:
                    raise
                servable, target = current, retry
                answer = target.predictor.submit(x, return_version=True, loop=loop)
            remaining = context.time_remaining()
            if remaining is not None and remaining < target.predictor.timeout_s:
                outputs, weight_version = await _within(answer, max(remaining, 0.0), loop)
            else:
                outputs, weight_version = await answer
        except InvalidInputError as e:
            raise _Abort(_Code.INVALID_ARGUMENT, str(e), "invalid_input") from None
        except Overloaded as e:
            raise _Abort(_Code.RESOURCE_EXHAUSTED, str(e), "overloaded") from None
        except PredictorClosed as e:
            raise _Abort(_Code.UNAVAILABLE, str(e), "closed") from None
        except TimeoutError as e:
            raise _Abort(_Code.DEADLINE_EXCEEDED, str(e) or "Deadline Exceeded",
                         "timeout") from None
        except PredictionFailed as e:
            raise _Abort(_Code.INTERNAL, str(e), "prediction_failed") from None
        version = target.label(weight_version)
        return servable, outputs, version

    def check_version(self, name: str, asked: int | None, label: str | None,
                      expected: int, answered: int) -> None:
        """NOT_FOUND when a pinned version was replaced while the request waited."""
        if (asked is not None or label is not None) and answered != expected:
            what = label if label is not None else asked
            raise _Abort(_Code.NOT_FOUND, f"Servable not found for request: Specific({name}, "
                         f"{what}): version {answered} replaced it while the request waited.",
                         "not_found")


async def _within(answer: asyncio.Future, seconds: float, loop: asyncio.AbstractEventLoop,
                  ) -> Any:
    """Awaits `answer`, cancelling it (the Predictor then drops it) after `seconds`."""
    expired = []

    def expire() -> None:
        if not answer.done():
            expired.append(True)
            answer.cancel()

    timer = loop.call_later(seconds, expire)
    try:
        return await answer
    except asyncio.CancelledError:
        if expired:
            raise TimeoutError(f"Deadline Exceeded: no answer within the client's deadline "
                               f"({seconds:.3g} s left when the request was queued).") from None
        raise
    finally:
        timer.cancel()


def _signature_outputs(servable: Any, target: Any, signature: str) -> list[str]:
    """The answer's output names: the signature's own keys for a SavedModel."""
    names = list(target.outputs.names)
    sig = (servable.signature_def or {}).get(signature)
    if sig is not None and len(names) == 1:
        keys = list(sig.get("outputs", {}))
        if len(keys) == 1:
            return keys  # a lone output: the Keras model lost its name
    return names


def _inputs(tensors: Any, fields: Any, signature: str) -> dict[str, np.ndarray]:
    """The request's tensors as arrays keyed by input name, checked as TF Serving does."""
    expected = [f.name for f in fields]
    sent = list(tensors.keys())
    if set(sent) != set(expected):
        extra = sorted(set(sent) - set(expected))
        missing = sorted(set(expected) - set(sent))
        raise _Abort(_Code.INVALID_ARGUMENT,
                     f"input size does not match signature: {len(sent)}!={len(expected)} "
                     f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}})"
                     f". Sent extra: {{{','.join(extra)}}}. Missing but required: "
                     f"{{{','.join(missing)}}}. Signature {signature!r} takes inputs "
                     f"{expected}; see GetModelMetadata.", "invalid_input")
    x = {}
    for i, field in enumerate(fields):
        proto = tensors[field.name]
        want = enum_of(field.dtype)
        if proto.dtype != want:
            raise _Abort(_Code.INVALID_ARGUMENT,
                         f"Expects arg[{i}] to be {dtype_name(want)} but "
                         f"{dtype_name(proto.dtype)} is provided: input '{field.name}' takes "
                         f"{field.describe()}. Set TensorProto.dtype to {dtype_name(want)} "
                         f"(e.g. tf.make_tensor_proto(x, dtype=...)).", "invalid_input")
        try:
            x[field.name] = to_array(proto, f"input '{field.name}'")
        except TensorError as e:
            raise _Abort(_Code.INVALID_ARGUMENT, str(e), "invalid_input") from None
    return x


def _model_spec(spec: Any, name: str, version: int, signature: str | None) -> None:
    spec.name = name
    spec.version.value = int(version)
    if signature is not None:
        spec.signature_name = signature


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService` over the server's models."""

    def __init__(self, server: GrpcServer):
        self.server = server

    async def Predict(self, request: predict_pb2.PredictRequest,
                      context: grpc.aio.ServicerContext) -> predict_pb2.PredictResponse:
        return await self.server.answer("grpc_predict", context,
                                        lambda: self._predict(request, context),
                                        request.model_spec.name, timed=True)

    async def _predict(self, request: Any, context: Any) -> predict_pb2.PredictResponse:
        srv = self.server
        spec = request.model_spec
        served, servable, asked, label = srv.resolve(spec)
        signature = spec.signature_name or DEFAULT_SIGNATURE
        target = servable.for_signature(signature)
        if target is None:
            raise _Abort(_Code.FAILED_PRECONDITION,
                         f"Serving signature key \"{signature}\" not found. This model has "
                         f"{', '.join(map(repr, servable.signature_names))}.", "not_found")
        names = _signature_outputs(servable, target, signature)
        chosen = list(request.output_filter)
        for alias in chosen:
            if alias not in names:
                raise _Abort(_Code.INVALID_ARGUMENT,
                             f"output tensor alias not found in signature: {alias} Outputs "
                             f"expected to be in the set {{{','.join(sorted(names))}}}.",
                             "invalid_input")
        if len(set(chosen)) != len(chosen):
            dup = next(a for a in chosen if chosen.count(a) > 1)
            raise _Abort(_Code.INVALID_ARGUMENT, f"duplicate output tensor alias: {dup}",
                         "invalid_input")
        x = _inputs(request.inputs, target.inputs, signature)
        expected = servable.current_version
        servable, outputs, version = await srv.run(spec, servable, target, signature, x,
                                                   context)
        srv.check_version(served.name, asked, label, expected, version)
        target = servable.for_signature(signature) or target
        flat = target.outputs.flatten(outputs)
        response = predict_pb2.PredictResponse()
        _model_spec(response.model_spec, served.name, version, signature)
        for name, value in zip(names, flat, strict=True):
            if not chosen or name in chosen:
                from_array(value, response.outputs[name])
        return response

    async def Classify(self, request: classification_pb2.ClassificationRequest,
                       context: grpc.aio.ServicerContext,
                       ) -> classification_pb2.ClassificationResponse:
        return await self.server.answer("grpc_classify", context,
                                        lambda: self._examples(request, context, "classify"),
                                        request.model_spec.name, timed=True)

    async def Regress(self, request: regression_pb2.RegressionRequest,
                      context: grpc.aio.ServicerContext) -> regression_pb2.RegressionResponse:
        return await self.server.answer("grpc_regress", context,
                                        lambda: self._examples(request, context, "regress"),
                                        request.model_spec.name, timed=True)

    async def _examples(self, request: Any, context: Any, method: str) -> Any:
        try:
            from keras_tandem.server import _examples as ex
        except ImportError:  # pragma: no cover - until tf.Example support is installed
            raise _Abort(_Code.UNIMPLEMENTED, f"{method.capitalize()} is not available in this "
                         "build; use Predict.", "unimplemented") from None
        srv = self.server
        spec = request.model_spec
        served, servable, asked, label = srv.resolve(spec)
        signature = spec.signature_name or DEFAULT_SIGNATURE
        target = servable.for_signature(signature)
        signature_def = servable.signature_def
        if target is None or signature_def is None or signature not in signature_def:
            raise _Abort(_Code.INVALID_ARGUMENT,
                         f"No signature was found with the name: {signature}. This model has "
                         f"{', '.join(map(repr, servable.signature_names))}"
                         + ("" if signature_def is not None else
                            " (a Keras model: only Predict; export a SavedModel with a "
                            f"{method} signature for {method.capitalize()})") + ".",
                         "invalid_input")
        try:
            serialized = ex.examples_from_input_proto(request.input)
            x = ex.prepare_examples(signature_def, signature, method, serialized)
        except (InvalidInputError, ValueError) as e:
            raise _Abort(_Code.INVALID_ARGUMENT, str(e), "invalid_input") from None
        expected = servable.current_version
        servable, outputs, version = await srv.run(spec, servable, target, signature, x,
                                                   context)
        srv.check_version(served.name, asked, label, expected, version)
        target = servable.for_signature(signature) or target
        by_name = dict(zip(_signature_outputs(servable, target, signature),
                           target.outputs.flatten(outputs), strict=True))
        try:
            if method == "classify":
                response = classification_pb2.ClassificationResponse()
                ex.fill_classification(response.result, ex.classify_results(
                    signature_def, signature, by_name))
            else:
                response = regression_pb2.RegressionResponse()
                ex.fill_regression(response.result, ex.regress_results(
                    signature_def, signature, by_name))
        except (InvalidInputError, ValueError) as e:
            raise _Abort(_Code.INVALID_ARGUMENT, str(e), "invalid_input") from None
        _model_spec(response.model_spec, served.name, version, signature)
        return response

    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext,
                               ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return await self.server.answer("grpc_metadata", context,
                                        lambda: self._metadata(request), request.model_spec.name)

    async def _metadata(self, request: Any) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise _Abort(_Code.INVALID_ARGUMENT, "Missing ModelSpec", "invalid_input")
        if not request.metadata_field:
            raise _Abort(_Code.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least "
                         f"one metadata_field (\"{_SIGNATURE_DEF}\").", "invalid_input")
        for field in request.metadata_field:
            if field != _SIGNATURE_DEF:
                raise _Abort(_Code.INVALID_ARGUMENT, f"Metadata field {field} is not supported; "
                             f"ask for \"{_SIGNATURE_DEF}\".", "invalid_input")
        served, servable, _, _ = self.server.resolve(request.model_spec)
        version = servable.current_version
        doc = metadata_doc(served.name, version, servable.inputs, servable.outputs,
                           servable.signature_def)
        signature_map = json_format.ParseDict(doc["metadata"][_SIGNATURE_DEF],
                                              get_model_metadata_pb2.SignatureDefMap(),
                                              ignore_unknown_fields=True)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _model_spec(response.model_spec, served.name, version, None)
        response.metadata[_SIGNATURE_DEF].Pack(signature_map)
        return response

    async def MultiInference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.server.observe("grpc_multi_inference", _Code.UNIMPLEMENTED, None, "unimplemented")
        await context.abort(_Code.UNIMPLEMENTED, "MultiInference is not supported: send one "
                            "Classify or Regress call per task.")


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService`: model status (config reloads are not taken)."""

    def __init__(self, server: GrpcServer):
        self.server = server

    async def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest,
                             context: grpc.aio.ServicerContext,
                             ) -> get_model_status_pb2.GetModelStatusResponse:
        return await self.server.answer("grpc_status", context, lambda: self._status(request),
                                        request.model_spec.name)

    async def _status(self, request: Any) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise _Abort(_Code.INVALID_ARGUMENT, "Missing ModelSpec", "invalid_input")
        spec = request.model_spec
        choice = spec.WhichOneof("version_choice")
        version = spec.version.value if choice == "version" else None
        lookup = self.server.lookup
        try:
            if choice == "version_label":  # the label's version
                _, servable = lookup.resolve(spec.name, None, spec.version_label)
                version = servable.current_version
            entries = lookup.status(spec.name, version)
        except ServableNotFound as e:
            raise _Abort(_Code.NOT_FOUND, e.message, "not_found") from None
        return json_format.ParseDict({"model_version_status": entries},
                                     get_model_status_pb2.GetModelStatusResponse())

    async def HandleReloadConfigRequest(self, request: Any,
                                        context: grpc.aio.ServicerContext) -> Any:
        self.server.observe("grpc_reload_config", _Code.UNIMPLEMENTED, None, "unimplemented")
        await context.abort(_Code.UNIMPLEMENTED,
                            "HandleReloadConfigRequest is not supported: edit the file of "
                            "`tandem serve --model-config-file` instead; it is re-read every "
                            "--model-config-file-poll-wait-seconds.")
