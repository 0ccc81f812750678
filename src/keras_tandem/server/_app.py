"""The aiohttp application: routes, request handlers and error mapping.

Owns: TF Serving's REST endpoints over one `ServedModel`, mapping the
Predictor's errors to HTTP statuses. Requests are queued with
`Predictor.submit(x, loop=...)`, the mechanism of `apredict`: the worker
wakes the event loop once per batch rather than once per request. Request
formats live in `_protocol`, versions in `_repository`, metrics in `_metrics`; no prediction
logic lives here.

Status codes: 400 bad JSON/shape/dtype (`InvalidInputError`), 404 unknown
model/version/path, 405 wrong method, 408 a body that stopped arriving
(`body_timeout_s` between two reads), 413 body over the limit (from
`Content-Length`, before reading), 503 + `Retry-After` when overloaded,
closing, not loaded yet, or when the request's bytes would take the bytes in
flight past `max_inflight_bytes`, 504 past the Predictor's timeout, 500 when
the forward pass failed. A client that goes away mid-request is counted with
code 499 and kind `client_closed`, and logged at DEBUG. Unexpected errors
are logged through a `RateLimitedLog` (one traceback per interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from keras_tandem.errors import InvalidInputError, Overloaded, PredictionFailed, PredictorClosed
from keras_tandem.server._limits import InflightBytes, RateLimitedLog, release_free_memory
from keras_tandem.server._metrics import CONTENT_TYPE, ServerMetrics
from keras_tandem.server._protocol import (
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
_VERSION = "{version:[^/:]+}"


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
    """The HTTP endpoints of one served model.

    Args:
        served: the `ServedModel`.
        metrics: its `ServerMetrics`.
        max_body_bytes: largest request body accepted (413 beyond it).
        retry_after_s: the `Retry-After` sent with 503.
        max_inflight_bytes: the most request bytes read, decoded and served
            at once (503 beyond it; a lone request always gets through).
        body_timeout_s: the longest wait for the next part of a body (408).
        logs: where unexpected errors are logged (rate-limited).
    """

    def __init__(self, served: ServedModel, metrics: ServerMetrics, max_body_bytes: int,
                 retry_after_s: int = 1, max_inflight_bytes: int | None = None,
                 body_timeout_s: float = 60.0, logs: RateLimitedLog | None = None):
        self.served = served
        self.metrics = metrics
        self.max_body_bytes = int(max_body_bytes)
        self.retry_after_s = int(retry_after_s)
        self.inflight = InflightBytes(max_inflight_bytes or 4 * self.max_body_bytes)
        self.body_timeout_s = float(body_timeout_s)
        self.logs = logs or RateLimitedLog(log)
        self._sampler: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def build(self) -> web.Application:
        """The aiohttp `Application` with every route."""
        app = web.Application(middlewares=[self._json_errors],
                              client_max_size=self.max_body_bytes)
        base = f"/v1/models/{_NAME}"
        app.router.add_post(f"{base}:predict", self.predict)
        app.router.add_post(f"{base}/versions/{_VERSION}:predict", self.predict)
        app.router.add_get(base, self.status)
        app.router.add_get(f"{base}/versions/{_VERSION}", self.status)
        app.router.add_get(f"{base}/metadata", self.metadata)
        app.router.add_get(f"{base}/versions/{_VERSION}/metadata", self.metadata)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/healthz", self.healthz)
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

    @web.middleware
    async def _json_errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own: no route, wrong method, too large
            if e.status < 400:
                raise
            kinds = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
            message = {404: f"Not found: {request.method} {request.path}",
                       413: self._too_large_message(request.content_length)}.get(
                e.status, e.reason or "HTTP error")
            err = _Error(e.status, message, kinds.get(e.status, "http"))
            self.metrics.observe("other", e.status, error_kind=err.kind)
            resp = err.response(close=e.status == 413)
            if e.status == 405 and "Allow" in e.headers:
                resp.headers["Allow"] = e.headers["Allow"]
            return resp
        except Exception as e:  # a bug answers 500 JSON
            self.logs.log("internal", logging.ERROR, "%s %s failed unexpectedly",
                          request.method, request.path, exc_info=True)
            err = _Error(500, f"Internal error: {type(e).__name__}: {e}", "internal")
            self.metrics.observe("other", 500, error_kind=err.kind)
            return err.response()

    def _too_large_message(self, length: int | None) -> str:
        got = f" ({length} bytes)" if length is not None else ""
        return (f"Request body too large{got}: the limit is {self.max_body_bytes} bytes. "
                "Send fewer rows per request, or raise the limit: `tandem serve "
                "--max-body-mb MB`, or `serve(..., max_body_bytes=N)`.")

    # ----------------------------------------------------------- predict

    async def predict(self, request: web.Request) -> web.Response:
        """`POST /v1/models/{name}[/versions/{v}]:predict`."""
        t0 = _now()
        reserved = [0]  # request bytes taken from the in-flight budget
        try:
            resp = await self._predict(request, reserved)
        except _Error as e:
            self.metrics.observe("predict", e.status, _now() - t0, e.kind)
            return e.response(close=e.status in (408, 413) or e.kind == "inflight_bytes")
        except (ConnectionError, RequestPayloadError) as e:
            if isinstance(e, RequestPayloadError) and request.transport is not None:
                self.metrics.observe("predict", 400, _now() - t0, "invalid_input")
                return _Error(400, f"Malformed request body: {e}", "invalid_input").response(
                    close=True)
            return self._client_closed(t0, e)
        except Exception as e:  # a bug answers 500 JSON, not a dropped socket
            self.logs.log("internal", logging.ERROR, "predict failed unexpectedly",
                          exc_info=True)
            err = _Error(500, f"Internal error: {type(e).__name__}: {e}", "internal")
            self.metrics.observe("predict", 500, _now() - t0, err.kind)
            return err.response()
        finally:
            self.inflight.give(reserved[0])
            if reserved[0] >= _TRIM_BYTES and not self.inflight.used:
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)
        if request.transport is None:  # the client left while its answer was computed
            return self._client_closed(t0, None)
        self.metrics.observe("predict", 200, _now() - t0)
        return resp

    def _client_closed(self, t0: float, error: BaseException | None) -> web.Response:
        log.debug("predict: the client closed the connection (%s)", error or "before the answer")
        self.metrics.observe("predict", 499, _now() - t0, "client_closed")
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

    async def _predict(self, request: web.Request, reserved: list[int]) -> web.Response:
        served = self.served
        match = request.match_info
        pinned = self._pinned_version(match)
        self._check_name(match["name"], pinned)
        body = await self._read_body(request, reserved)
        servable = served.current
        if servable is None:
            raise self._unavailable(f"Model '{served.name}' has no version loaded yet.")
        if pinned is not None and pinned != servable.current_version:
            raise self._no_version(pinned)
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
            parse = functools.partial(_parse, signature=signature,
                                      signature_names=servable.signature_names)
            if len(body) > _OFFLOAD_BYTES:
                x, fmt = await asyncio.get_running_loop().run_in_executor(
                    None, parse, body, target.inputs)
            else:
                x, fmt = parse(body, target.inputs)
            del body  # the decoded input is all that is needed now
            servable, answer = self._submit(target, x, signature)
            del x
            outputs, weight_version = await answer
        except InvalidInputError as e:
            raise _Error(400, str(e), "invalid_input") from None
        except Overloaded as e:
            raise self._unavailable(str(e), "overloaded") from None
        except PredictorClosed as e:
            raise self._unavailable(str(e), "closed") from None
        except TimeoutError as e:
            raise _Error(504, str(e), "timeout") from None
        except PredictionFailed as e:
            raise _Error(500, str(e), "prediction_failed") from None
        version = servable.label(weight_version)
        if pinned is not None and version != pinned:
            raise _Error(404, f"Servable not found for request: Specific({served.name}, "
                              f"{pinned}): version {version} replaced it while the request "
                              "waited.", "not_found")
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

    def _submit(self, servable: Servable, x: Any,
                signature: str = _DEFAULT_SIGNATURE) -> tuple[Servable, Any]:
        # A future of the server's loop (a concurrent one before the app
        # starts): answered through the Predictor's loop bridge, as apredict is.
        loop = self._loop
        try:
            return servable, servable.predictor.submit(x, return_version=True, loop=loop)
        except PredictorClosed:
            current = self.served.current  # swapped out under us: the new one answers
            current = current.for_signature(signature) if current is not None else None
            if current is None or current is servable:
                raise
            return current, current.predictor.submit(x, return_version=True, loop=loop)

    def _unavailable(self, message: str, kind: str = "unavailable") -> _Error:
        return _Error(503, message, kind, retry_after=self.retry_after_s)

    def _no_version(self, version: Any) -> _Error:
        return _Error(404, f"Servable not found for request: Specific({self.served.name}, "
                           f"{version})", "not_found")

    def _pinned_version(self, match: Any) -> int | None:
        v = match.get("version")
        if v is None:
            return None
        try:
            return int(v)
        except ValueError:
            raise _Error(404, f"Invalid version {v!r}: versions are integers.",
                         "not_found") from None

    def _check_name(self, name: str, pinned: int | None) -> None:
        if name != self.served.name:
            which = f"Latest({name})" if pinned is None else f"Specific({name}, {pinned})"
            raise _Error(404, f"Servable not found for request: {which}", "not_found")

    # -------------------------------------------------------- the others

    async def status(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{name}[/versions/{v}]`: TF Serving's model status."""
        try:
            pinned = self._pinned_version(request.match_info)
            name = request.match_info["name"]
            if name != self.served.name:
                raise _Error(404, f"Could not find any versions of model {name}", "not_found")
            entries = self.served.status(pinned)
            if not entries:
                raise (self._no_version(pinned) if pinned is not None else _Error(
                    404, f"Could not find any versions of model {name}", "not_found"))
        except _Error as e:
            self.metrics.observe("status", e.status, error_kind=e.kind)
            return e.response()
        self.metrics.observe("status", 200)
        return _json({"model_version_status": entries})

    async def metadata(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{name}[/versions/{v}]/metadata`: inputs and outputs."""
        try:
            pinned = self._pinned_version(request.match_info)
            self._check_name(request.match_info["name"], pinned)
            servable = self.served.current
            if servable is None:
                raise self._unavailable(f"Model '{self.served.name}' has no version loaded yet.")
            version = servable.current_version
            if pinned is not None and pinned != version:
                raise self._no_version(pinned)
        except _Error as e:
            self.metrics.observe("metadata", e.status, error_kind=e.kind)
            return e.response()
        self.metrics.observe("metadata", 200)
        return _json(metadata_doc(self.served.name, version, servable.inputs, servable.outputs,
                                  servable.signature_def))

    async def prometheus(self, request: web.Request) -> web.Response:
        """`GET /metrics`: Prometheus text format."""
        self.metrics.observe("metrics", 200)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        """`GET /healthz`: 200 while a version is served, else 503."""
        servable = self.served.current
        if servable is None:
            err = self._unavailable(f"Model '{self.served.name}' has no version loaded yet.")
            self.metrics.observe("healthz", 503, error_kind=err.kind)
            return err.response()
        self.metrics.observe("healthz", 200)
        return _json({"status": "ok", "model": self.served.name,
                      "version": str(servable.current_version)})
