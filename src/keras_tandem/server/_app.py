"""The aiohttp application: routes, request handlers and error mapping.

Owns: TF Serving's REST endpoints over the server's models, each request
routed by model name (and version or label) through a `ModelLookup`
(`_lookup`: the model registry, or one model), mapping the Predictor's
errors to HTTP statuses. Requests are queued with
`Predictor.submit(x, loop=...)`, the mechanism of `apredict`: the worker
wakes the event loop once per batch rather than once per request. Request
formats live in `_protocol` (`:classify` / `:regress` examples and results
in `_examples`), versions in `_repository`, metrics in `_metrics`; no
prediction logic lives here.

Status codes: 400 bad JSON/shape/dtype (`InvalidInputError`) or an unknown
version label ("Unrecognized servable version label"), 404 unknown
model/version/path ("Servable not found for request: ..."), 405 wrong
method, 408 a body that stopped arriving (`body_timeout_s` between two
reads), 413 body over the limit (from `Content-Length`, before reading), 503
+ `Retry-After` when overloaded, closing, not loaded yet, or when the
request's bytes would take the bytes in flight past `max_inflight_bytes`,
504 past the Predictor's timeout, 500 when the forward pass failed. A client
that goes away mid-request is counted with code 499 and kind
`client_closed`, and logged at DEBUG. Unexpected errors are logged through a
`RateLimitedLog` (one traceback per interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from keras_tandem.errors import InvalidInputError, Overloaded, PredictionFailed, PredictorClosed
from keras_tandem.server._limits import InflightBytes, RateLimitedLog, release_free_memory
from keras_tandem.server._lookup import ModelLookup, ServableNotFound, SingleModel, UnknownLabel
from keras_tandem.server._metrics import CONTENT_TYPE, ServerMetrics
from keras_tandem.server._protocol import (
    _loads,
    dumps,
    error_body,
    format_predictions,
    metadata_doc,
    signature_name_of,
)
from keras_tandem.server._protocol import parse_predict_body as _parse
from keras_tandem.server._repository import Servable, ServedModel
from keras_tandem.server._savedmodel import DEFAULT_SIGNATURE as _DEFAULT_SIGNATURE

log = logging.getLogger("keras_tandem.server")
_now = time.perf_counter

# Bodies (and answers) larger than this are decoded (encoded) on a worker
# thread, so one huge request does not stall the event loop for the others.
_OFFLOAD_BYTES = 256 * 1024
# Once no request is in flight after one this large, the heap's free pages go
# back to the system (`release_free_memory`).
_TRIM_BYTES = 4 * 1024 * 1024
_NAME = "{name:[^/:]+}"
_PREDICTOR_ERRORS = (InvalidInputError, Overloaded, PredictorClosed, TimeoutError,
                     PredictionFailed)
_VERSION = "{version:[^/:]+}"
_LABEL = "{label:[^/:]+}"
# The paths that name a model: its newest version, one version, one label.
_MODEL_PATHS = ("", f"/versions/{_VERSION}", f"/labels/{_LABEL}")
METRICS_PATHS = ("/metrics", "/monitoring/prometheus/metrics")


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    h = {"Content-Type": "application/json"}
    if headers:
        h.update(headers)
    return web.Response(body=dumps(doc), status=status, headers=h)


class _Error(Exception):
    """An HTTP error answer: status, message, metric kind, extra headers."""

    def __init__(self, status: int, message: str, kind: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.retry_after = retry_after

    def response(self, close: bool = False) -> web.Response:
        headers = {"Content-Type": "application/json"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        resp = web.Response(body=error_body(self.message), status=self.status, headers=headers)
        if close:
            resp.force_close()
        return resp


class ModelApp:
    """The HTTP endpoints of the server's models.

    Args:
        models: the `ModelLookup` every request is routed through (the
            model registry), or one `ServedModel`.
        metrics: the server's `ServerMetrics`.
        max_body_bytes: largest request body accepted (413 beyond it).
        retry_after_s: the `Retry-After` sent with 503.
        max_inflight_bytes: the most request bytes read, decoded and served
            at once (503 beyond it; a lone request always gets through).
        body_timeout_s: the longest wait for the next part of a body (408).
        logs: where unexpected errors are logged (rate-limited).
    """

    def __init__(self, models: ModelLookup | ServedModel, metrics: ServerMetrics | None,
                 max_body_bytes: int, retry_after_s: int = 1,
                 max_inflight_bytes: int | None = None, body_timeout_s: float = 60.0,
                 logs: RateLimitedLog | None = None):
        self.models: ModelLookup = (SingleModel(models) if isinstance(models, ServedModel)
                                    else models)
        self.metrics = metrics
        self.max_body_bytes = int(max_body_bytes)
        self.retry_after_s = int(retry_after_s)
        self.inflight = InflightBytes(max_inflight_bytes or 4 * self.max_body_bytes)
        self.body_timeout_s = float(body_timeout_s)
        self.logs = logs or RateLimitedLog(log)
        self._sampler: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._no_route_resource: Any = None

    def build(self) -> web.Application:
        """The aiohttp `Application` with every route.

        There is no middleware: it would wrap every request in two more
        coroutine frames. The predict-like handlers map their own errors
        (`_answer`), the others are `_guarded`, and a last route takes every
        path and method no other route takes, answering the JSON 404 or 405.
        """
        app = web.Application(client_max_size=self.max_body_bytes)
        for which in _MODEL_PATHS:
            base = f"/v1/models/{_NAME}{which}"
            app.router.add_post(f"{base}:predict", self.predict)
            app.router.add_post(f"{base}:classify", self.classify)
            app.router.add_post(f"{base}:regress", self.regress)
            app.router.add_get(base, self._guarded(self.status))
            app.router.add_get(f"{base}/metadata", self._guarded(self.metadata))
        for path in METRICS_PATHS:
            app.router.add_get(path, self._guarded(self.prometheus))
        app.router.add_get("/healthz", self._guarded(self.healthz))
        self._no_route_resource = app.router.add_route("*", "/{path:.*}", self._no_route).resource
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._schedule_sample(loop)

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._sampler is not None:
            self._sampler.cancel()

    def _schedule_sample(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.metrics.sample()
            self.logs.flush()
        except Exception:  # metrics must never take the server down
            self.logs.log("sample", logging.ERROR, "sampling the Predictor's stats failed",
                          exc_info=True)
        self._sampler = loop.call_later(0.5, self._schedule_sample, loop)

    async def _no_route(self, request: web.Request) -> web.Response:
        """The JSON 404 (no route takes the path) or 405 (routes take it, not this method)."""
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not self._no_route_resource:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            err = _Error(405, HTTPStatus.METHOD_NOT_ALLOWED.phrase, "method_not_allowed")
        else:
            err = _Error(404, f"Not found: {request.method} {request.path}", "not_found")
        self.metrics.observe("other", err.status, error_kind=err.kind)
        resp = err.response()
        if allowed:
            resp.headers["Allow"] = ",".join(sorted(allowed))  # as aiohttp's own 405
        return resp

    def _guarded(self, handler: Any) -> Any:
        """`handler`, answering an unexpected error with a JSON 500 (and logging it)."""

        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except Exception as e:  # a bug answers 500 JSON
                self.logs.log("internal", logging.ERROR, "%s %s failed unexpectedly",
                              request.method, request.path, exc_info=True)
                err = _Error(500, f"Internal error: {type(e).__name__}: {e}", "internal")
                self.metrics.observe("other", 500, error_kind=err.kind)
                return err.response()

        return guarded

    def _too_large_message(self, length: int | None) -> str:
        got = f" ({length} bytes)" if length is not None else ""
        return (f"Request body too large{got}: the limit is {self.max_body_bytes} bytes. "
                "Send fewer rows per request, or raise the limit: `tandem serve "
                "--max-body-mb MB`, or `serve(..., max_body_bytes=N)`.")

    # ----------------------------------------------------------- predict

    async def predict(self, request: web.Request) -> web.Response:
        """`POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict`."""
        return await self._answer(request, "predict", self._predict)

    async def classify(self, request: web.Request) -> web.Response:
        """`POST /v1/models/{name}[/versions/{v}|/labels/{l}]:classify`."""
        return await self._answer(request, "classify",
                                  functools.partial(self._examples, method="classify"))

    async def regress(self, request: web.Request) -> web.Response:
        """`POST /v1/models/{name}[/versions/{v}|/labels/{l}]:regress`."""
        return await self._answer(request, "regress",
                                  functools.partial(self._examples, method="regress"))

    async def _answer(self, request: web.Request, endpoint: str, run: Any) -> web.Response:
        """Runs `run(request, reserved)`, mapping errors to answers and counting the request."""
        t0 = _now()
        model = request.match_info.get("name")
        reserved = [0]  # request bytes taken from the in-flight budget
        try:
            resp = await run(request, reserved)
        except _Error as e:
            self.metrics.observe(endpoint, e.status, _now() - t0, e.kind, model=model)
            return e.response(close=e.status in (408, 413) or e.kind == "inflight_bytes")
        except (ConnectionError, RequestPayloadError) as e:
            if isinstance(e, RequestPayloadError) and request.transport is not None:
                self.metrics.observe(endpoint, 400, _now() - t0, "invalid_input", model=model)
                return _Error(400, f"Malformed request body: {e}", "invalid_input").response(
                    close=True)
            return self._client_closed(t0, e, endpoint, model)
        except Exception as e:  # a bug answers 500 JSON, not a dropped socket
            self.logs.log("internal", logging.ERROR, "%s failed unexpectedly", endpoint,
                          exc_info=True)
            err = _Error(500, f"Internal error: {type(e).__name__}: {e}", "internal")
            self.metrics.observe(endpoint, 500, _now() - t0, err.kind, model=model)
            return err.response()
        finally:
            self.inflight.give(reserved[0])
            if reserved[0] >= _TRIM_BYTES and not self.inflight.used:
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)
        if request.transport is None:  # the client left while its answer was computed
            return self._client_closed(t0, None, endpoint, model)
        self.metrics.observe(endpoint, 200, _now() - t0, model=model)
        return resp

    def _client_closed(self, t0: float, error: BaseException | None, endpoint: str = "predict",
                       model: str | None = None) -> web.Response:
        log.debug("%s: the client closed the connection (%s)", endpoint,
                  error or "before the answer")
        self.metrics.observe(endpoint, 499, _now() - t0, "client_closed", model=model)
        resp = web.Response(status=400, body=error_body("client closed the connection"),
                            content_type="application/json")  # never sent: the socket is gone
        resp.force_close()
        return resp

    async def _read_body(self, request: web.Request, reserved: list[int]) -> bytes | bytearray:
        """Reads the body into one buffer, taking its bytes from the in-flight budget.

        The body is read as it arrives rather than with `request.read()`,
        which holds it twice (its chunks, then their join); each wait for
        more has `body_timeout_s`.
        """
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise _Error(413, self._too_large_message(length), "too_large")
        if length is not None:
            self._reserve(reserved, length)
        content = request.content
        chunk = content.read_nowait()
        if length is not None and len(chunk) == length:
            return chunk  # the whole body came with the headers (small requests): no copy
        body = bytearray(length or 0)  # chunked bodies grow as they arrive
        got = 0
        with memoryview(body) if length is not None else contextlib.nullcontext() as view:
            while chunk or (chunk := await self._next_chunk(content)) is not None:
                if length is None:
                    if got + len(chunk) > self.max_body_bytes:
                        raise _Error(413, self._too_large_message(None), "too_large")
                    self._reserve(reserved, len(chunk))
                    body += chunk
                elif got + len(chunk) > length:  # aiohttp's parser stops at Content-Length
                    raise _Error(400, "The body is longer than its Content-Length.",
                                 "invalid_input")
                else:
                    view[got:got + len(chunk)] = chunk
                got += len(chunk)
                chunk = b""
        if length is not None and got < length:
            raise ConnectionResetError("the body ended before its Content-Length")
        return body

    async def _next_chunk(self, content: Any) -> bytes | None:
        chunk = content.read_nowait()  # what has arrived already: no wait, no timer
        if chunk:
            return chunk
        if content.at_eof():
            return None
        try:
            chunk = await asyncio.wait_for(content.readany(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise _Error(408, f"Request body stalled: nothing arrived for "
                              f"{self.body_timeout_s:g} s (tandem serve --body-timeout-s).",
                         "body_timeout") from None
        return chunk or None

    def _reserve(self, reserved: list[int], n: int) -> None:
        if not self.inflight.take(n):
            raise _Error(503, f"Server busy: {self.inflight.used} bytes of requests are in "
                              f"flight and this one adds {n}, past the limit of "
                              f"{self.inflight.limit} (tandem serve --max-inflight-bytes). "
                              f"Retry after {self.retry_after_s} s.", "inflight_bytes",
                         retry_after=self.retry_after_s)
        reserved[0] += n

    def _resolve(self, match: Any) -> tuple[tuple[str, int | None, str | None], Any, int | None]:
        """`((name, version, label), servable, version the request pins or None)`.

        Raises:
            _Error: 404 unknown model or version, 400 unknown label, 503 nothing loaded yet.
        """
        name, version, label = match["name"], self._pinned_version(match), match.get("label")
        try:
            _, servable = self.models.resolve(name, version, label)
        except UnknownLabel as e:
            raise _Error(400, e.message, "unknown_label") from None
        except ServableNotFound as e:
            if e.unavailable:
                raise self._unavailable(e.message) from None
            raise _Error(404, e.message, "not_found") from None
        pinned = version if version is not None else (
            servable.current_version if label is not None else None)
        return (name, version, label), servable, pinned

    async def _predict(self, request: web.Request, reserved: list[int]) -> web.Response:
        key, servable, pinned = self._resolve(request.match_info)
        body = await self._read_body(request, reserved)
        try:
            signature = _DEFAULT_SIGNATURE
            if servable.signatures and b"signature_name" in body:
                if len(body) > _OFFLOAD_BYTES:
                    name = await asyncio.get_running_loop().run_in_executor(
                        None, signature_name_of, body)
                else:
                    name = signature_name_of(body)
                signature = name or _DEFAULT_SIGNATURE
            target = servable.for_signature(signature)
            if target is None:
                raise InvalidInputError(
                    f"Serving signature name: \"{signature}\" not found in signature def. "
                    f"This model has {', '.join(map(repr, servable.signature_names))}.")
            if len(body) > _OFFLOAD_BYTES or servable.signatures:
                parse = functools.partial(_parse, signature=signature,
                                          signature_names=servable.signature_names)
                if len(body) > _OFFLOAD_BYTES:
                    x, fmt = await asyncio.get_running_loop().run_in_executor(
                        None, parse, body, target.inputs)
                else:
                    x, fmt = parse(body, target.inputs)
            else:  # a small body for a model of one signature: the parser's defaults fit
                x, fmt = _parse(body, target.inputs)
            del body  # the decoded input is all that is needed now
            servable, answer = self._submit(target, x, signature, key)
            del x
            outputs, weight_version = await answer
        except _PREDICTOR_ERRORS as e:
            raise self._predictor_error(e) from None
        version = self._answered_version(key, servable, weight_version, pinned)
        try:
            if getattr(outputs, "nbytes", 0) > _OFFLOAD_BYTES:
                payload = await asyncio.get_running_loop().run_in_executor(
                    None, format_predictions, outputs, servable.outputs, fmt)
            else:
                payload = format_predictions(outputs, servable.outputs, fmt)
        except (TypeError, ValueError) as e:
            raise _Error(500, f"Could not encode the answer as JSON: {e}", "internal") from None
        return web.Response(body=payload, headers={
            "Content-Type": "application/json",
            "X-Model-Version": str(version),
            "X-Weight-Version": str(weight_version),
        })

    def _predictor_error(self, e: Exception) -> _Error:
        if isinstance(e, InvalidInputError):
            return _Error(400, str(e), "invalid_input")
        if isinstance(e, Overloaded):
            return self._unavailable(str(e), "overloaded")
        if isinstance(e, PredictorClosed):
            return self._unavailable(str(e), "closed")
        if isinstance(e, TimeoutError):
            return _Error(504, str(e), "timeout")
        return _Error(500, str(e), "prediction_failed")

    def _answered_version(self, key: tuple[str, int | None, str | None], servable: Servable,
                          weight_version: int, pinned: int | None) -> int:
        """The model version that answered; 404 if it is not the one the request pinned."""
        version = servable.label(weight_version)
        if pinned is not None and version != pinned:
            name, _, label = key
            raise _Error(404, f"Servable not found for request: Specific({name}, "
                              f"{label if label is not None else pinned}): version {version} "
                              "replaced it while the request waited.", "not_found")
        return version

    def _submit(self, servable: Servable, x: Any, signature: str = _DEFAULT_SIGNATURE,
                key: tuple[str, int | None, str | None] | None = None) -> tuple[Servable, Any]:
        # A future of the server's loop (a concurrent one before the app
        # starts): answered through the Predictor's loop bridge, as apredict is.
        loop = self._loop
        try:
            return servable, servable.predictor.submit(x, return_version=True, loop=loop)
        except PredictorClosed:
            # Swapped out or unloaded under us: what the request names now answers.
            if key is None:
                names = self.models.names()
                if len(names) != 1:
                    raise
                key = (names[0], None, None)
            try:
                _, current = self.models.resolve(*key)
            except ServableNotFound:
                raise PredictorClosed(f"Model '{key[0]}': the version that was to answer "
                                      "was unloaded; retry.") from None
            current = current.for_signature(signature)
            if current is None or current is servable:
                raise
            return current, current.predictor.submit(x, return_version=True, loop=loop)

    async def _examples(self, request: web.Request, reserved: list[int],
                        method: str) -> web.Response:
        """`:classify` / `:regress`: TF Serving's `examples` in, `results` out."""
        from keras_tandem.server import _examples

        key, servable, pinned = self._resolve(request.match_info)
        body = await self._read_body(request, reserved)
        loop = asyncio.get_running_loop()
        try:
            doc = (await loop.run_in_executor(None, _loads, body) if len(body) > _OFFLOAD_BYTES
                   else _loads(body))
            del body
            if not isinstance(doc, dict):
                raise InvalidInputError(f"The :{method} body must be a JSON object with "
                                        '"examples" (and optionally "context").')
            signature = doc.get("signature_name") or _DEFAULT_SIGNATURE
            if not isinstance(signature, str):
                raise InvalidInputError("'signature_name' key must be a string value.")
            serialized = _examples.examples_from_json(doc)
            del doc
            x = _examples.prepare_examples(servable.signature_def, signature, method, serialized)
            target = servable.for_signature(signature)
            if target is None:
                raise InvalidInputError(
                    f"Serving signature name: \"{signature}\" not found in signature def. "
                    f"This model has {', '.join(map(repr, servable.signature_names))}.")
            answered, answer = self._submit(target, x, signature, key)
            outputs, weight_version = await answer
            version = self._answered_version(key, answered, weight_version, pinned)
            if method == "classify":
                results = _examples.classify_results(servable.signature_def, signature, outputs)
            else:
                results = _examples.regress_results(servable.signature_def, signature, outputs)
            payload = _examples.results_json(results)
        except _PREDICTOR_ERRORS as e:
            raise self._predictor_error(e) from None
        return web.Response(body=payload, headers={
            "Content-Type": "application/json",
            "X-Model-Version": str(version),
            "X-Weight-Version": str(weight_version),
        })

    def _unavailable(self, message: str, kind: str = "unavailable") -> _Error:
        return _Error(503, message, kind, retry_after=self.retry_after_s)

    def _pinned_version(self, match: Any) -> int | None:
        v = match.get("version")
        if v is None:
            return None
        try:
            return int(v)
        except ValueError:
            raise _Error(404, f"Invalid version {v!r}: versions are integers.",
                         "not_found") from None

    # -------------------------------------------------------- the others

    async def status(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{name}[/versions/{v}|/labels/{l}]`: TF Serving's model status."""
        name = request.match_info["name"]
        try:
            pinned = self._pinned_version(request.match_info)
            label = request.match_info.get("label")
            if label is not None:
                _, _, pinned = self._resolve(request.match_info)
            try:
                entries = self.models.status(name, pinned)
            except ServableNotFound as e:
                raise _Error(404, e.message, "not_found") from None
        except _Error as e:
            self.metrics.observe("status", e.status, error_kind=e.kind, model=name)
            return e.response()
        self.metrics.observe("status", 200, model=name)
        return _json({"model_version_status": entries})

    async def metadata(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata`: inputs and outputs."""
        name = request.match_info["name"]
        try:
            _, servable, _ = self._resolve(request.match_info)
            version = servable.current_version
        except _Error as e:
            self.metrics.observe("metadata", e.status, error_kind=e.kind, model=name)
            return e.response()
        self.metrics.observe("metadata", 200, model=name)
        return _json(metadata_doc(name, version, servable.inputs, servable.outputs,
                                  servable.signature_def))

    async def prometheus(self, request: web.Request) -> web.Response:
        """`GET /metrics`: Prometheus text format."""
        self.metrics.observe("metrics", 200)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        """`GET /healthz`: 200 while every model has a version loaded, else 503 naming the rest."""
        versions: dict[str, str] = {}
        missing = []
        for name in self.models.names():
            try:
                _, servable = self.models.resolve(name)
            except ServableNotFound:
                missing.append(name)
                continue
            versions[name] = str(servable.current_version)
        if missing or not versions:
            err = self._unavailable(
                "No version loaded yet of model(s) " + ", ".join(repr(n) for n in missing)
                if missing else "No model is served.")
            self.metrics.observe("healthz", 503, error_kind=err.kind)
            return err.response()
        self.metrics.observe("healthz", 200)
        first = next(iter(versions))
        return _json({"status": "ok", "model": first, "version": versions[first],
                      "models": versions})
