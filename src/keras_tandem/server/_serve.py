"""`serve()`: start the HTTP server on a background thread; `ServerHandle` stops it.

Owns the server's lifecycle: deciding what is served (a Predictor, a Keras
model, a `.keras` file or a base directory of versions), the event-loop
thread running aiohttp (with the limits of `_limits` and the guarded socket
of `_connections`, and a loop exception handler that rate-limits accept
errors), the version watcher thread, and shutting all of it down in order
(stop listening, finish in-flight requests, stop the watcher, close the
Predictors the server created).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from keras_tandem.server._app import ModelApp, log
from keras_tandem.server._connections import ConnectionGuard, GuardedSite
from keras_tandem.server._limits import (
    RateLimitedLog,
    default_max_connections,
    default_max_inflight_bytes,
)
from keras_tandem.server._metrics import ServerMetrics
from keras_tandem.server._repository import (
    Servable,
    ServedModel,
    VersionWatcher,
    is_complete_keras_file,
    load_keras_model,
    probe_outputs,
    servable_from_model,
    servable_from_saved_model,
)
from keras_tandem.server._savedmodel import is_saved_model_dir
from keras_tandem.serving.predictor import Predictor

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
# Longer than any browser or curl takes to send headers or the next part of a
# body (nginx's client_header_timeout and client_body_timeout are 60 s too).
DEFAULT_HEADER_TIMEOUT_S = 60.0
DEFAULT_BODY_TIMEOUT_S = 60.0


class ServerHandle:
    """A running server. Stop it with `stop()` or by leaving a `with` block.

    Attributes:
        name: the model name in URLs.
        host: the address it listens on.
        port: the port it listens on (the real one when 0 was asked for).
        url: `http://host:port`.
    """

    def __init__(self, served: ServedModel, app: ModelApp, host: str, port: int,
                 watcher: VersionWatcher | None, shutdown_timeout_s: float,
                 guard: ConnectionGuard):
        self.name = served.name
        self.host = host
        self._served = served
        self._app = app
        self._watcher = watcher
        self._shutdown_timeout_s = shutdown_timeout_s
        self._guard = guard
        self._stopped = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(host, port, ready),
                                        name="keras-tandem-http", daemon=True)
        self._thread.start()
        try:
            self.port: int = ready.result()
        except BaseException:
            self._thread.join()
            raise
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"

    @property
    def version(self) -> int | None:
        """The model version now answering (None before the first one loads)."""
        cur = self._served.current
        return None if cur is None else cur.current_version

    @property
    def predictor(self) -> Predictor | None:
        """The Predictor now answering (it changes when a new architecture loads)."""
        cur = self._served.current
        return None if cur is None else cur.predictor

    def status(self) -> list[dict[str, Any]]:
        """The model's TF Serving `model_version_status` list, as `GET /v1/models/NAME`."""
        return self._served.status()

    def _run(self, host: str, port: int, ready: Future) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(partial(_loop_exception, self._app.logs))
        runner = web.AppRunner(self._app.build(), access_log=None, handle_signals=False,
                               shutdown_timeout=self._shutdown_timeout_s)
        try:
            loop.run_until_complete(runner.setup())
            site = GuardedSite(runner, host, port, self._guard, backlog=1024)
            loop.run_until_complete(site.start())
            bound = runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001 - re-raised in serve()
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set_exception(e)
            return
        ready.set_result(bound)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())  # finishes in-flight requests
            loop.close()

    def stop(self) -> None:
        """Stops listening, answers in-flight requests, stops watching, closes what it made.

        Idempotent. A Predictor passed to `serve()` is not closed: its owner
        closes it.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._watcher is not None:
            self._watcher.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        cur = self._served.current
        if cur is not None and cur.owned:
            cur.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerHandle {self.name!r} at {self.url} version={self.version}>"


def _loop_exception(logs: RateLimitedLog, loop: asyncio.AbstractEventLoop,
                    context: dict[str, Any]) -> None:
    # CPython 3.11's accept loop reports EMFILE once per accept slot and again a
    # second later while the limit holds: one line per interval, with a count.
    message = str(context.get("message", "event loop error"))
    error = context.get("exception")
    logs.log(f"loop:{message}", logging.ERROR, "%s: %r", message, error,
             exc_info=None if message.startswith("socket.accept()") else error)


def _freeze_gc() -> None:
    gc.collect()
    gc.freeze()


def serve(
    predictor: Any,
    *,
    name: str,
    host: str = "127.0.0.1",
    port: int = 8501,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    poll_interval_s: float = 1.0,
    predictor_options: dict[str, Any] | None = None,
    output_names: list[str] | None = None,
    retry_after_s: int = 1,
    shutdown_timeout_s: float = 5.0,
    freeze_gc: bool = True,
    max_inflight_bytes: int | None = None,
    max_connections: int | None = None,
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> ServerHandle:
    """Serves a model over HTTP with TensorFlow Serving's REST API, in the background.

    Endpoints: `POST /v1/models/NAME:predict`, `POST /v1/models/NAME/versions/V:predict`,
    `GET /v1/models/NAME`, `GET /v1/models/NAME/metadata`, `GET /metrics`,
    `GET /healthz`. Every request goes through one Predictor, so concurrent
    clients are batched together. Answers carry `X-Model-Version` and
    `X-Weight-Version` headers.

    Args:
        predictor: what to serve:
            - a `Predictor` (yours: training may keep calling `update_weights`
              on it; the version served is its weight version; `stop()` does
              not close it);
            - a Keras model (the server wraps it in a Predictor of its own);
            - a path to a `.keras` file, or a SavedModel directory (its
              signatures chosen by `signature_name`), served as version 1;
            - a path to a TF Serving-style base directory with numbered
              version subdirectories (`BASE/1/model.keras`,
              `BASE/2/saved_model.pb`, ...): the newest
              complete version is served, and newer ones are swapped in as
              they appear.
        name: the model name in URLs.
        host: the address to bind; keep 127.0.0.1 unless clients elsewhere
            must reach it (there is no authentication).
        port: the port; 0 picks a free one (see `handle.port`).
        max_body_bytes: largest request body; larger ones get 413 before
            the body is read.
        poll_interval_s: how often a base directory is scanned.
        predictor_options: keyword arguments for the Predictors the server
            creates (`max_batch_size`, `max_delay_ms`, `queue_size`, ...).
        output_names: names for the outputs of a Predictor passed in
            (default: the names in `Predictor.outputs`: the model's output
            names where it has them, else `output_0`, ...).
        retry_after_s: the `Retry-After` header sent with 503.
        shutdown_timeout_s: how long `stop()` lets in-flight requests finish.
        freeze_gc: call `gc.freeze()` once the model is loaded (and again
            after a new architecture loads), so that Python's full garbage
            collections skip the millions of long-lived TensorFlow and Keras
            objects. Without it, each full collection walks that whole heap
            while every request waits, which shows in the tail latency
            (docs/measurements.md). Process-wide; objects created later are
            collected as usual.
        max_inflight_bytes: the most request bytes being read, decoded and
            answered at once, across all requests; beyond it a request gets
            503 with `Retry-After` (a request alone always gets through).
            Default: an eighth of the memory the process may use (its
            cgroup limit or the machine's), at least `max_body_bytes`.
        max_connections: the most open connections; one more is answered
            503 and closed at once. Default: the soft file-descriptor limit
            less the descriptors open now and a reserve (64, or a tenth of
            the limit) for model loading and checkpoints.
        header_timeout_s: how long a connection may take to send a
            request's headers, idle keep-alive time included; then it is
            closed (slowloris clients).
        body_timeout_s: the longest wait for the next part of a request
            body; then 408.

    Returns:
        A `ServerHandle` (`url`, `port`, `version`, `stop()`); a context manager.

    Raises:
        ValueError: `predictor` is a path with nothing loadable, or of an unknown kind;
            a limit or timeout that is not positive.
        OSError: the address is in use.
    """
    for arg, value in (("max_inflight_bytes", max_inflight_bytes),
                       ("max_connections", max_connections)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be a positive number (or None for the default "
                             f"from this machine); got {value}.")
    for arg, value in (("header_timeout_s", header_timeout_s),
                       ("body_timeout_s", body_timeout_s)):
        if not value > 0:
            raise ValueError(f"{arg} must be positive; got {value}.")
    options = dict(predictor_options or {})
    watcher = None
    if isinstance(predictor, Predictor):
        served = ServedModel(name, Servable(predictor, probe_outputs(predictor, output_names),
                                            version=None, owned=False))
    elif isinstance(predictor, (str, os.PathLike)):
        path = Path(predictor)
        if is_saved_model_dir(path):  # one SavedModel, served as version 1
            served = ServedModel(name, servable_from_saved_model(path, 1, options))
        elif path.is_dir():
            served = ServedModel(name)
            watcher = VersionWatcher(served, path, options, poll_interval_s)
            watcher.load_initial()
        elif path.is_file():
            if not is_complete_keras_file(path):
                raise ValueError(f"{path} is not a complete .keras file.")
            served = ServedModel(name, servable_from_model(load_keras_model(path), 1, options))
        else:
            raise ValueError(f"{path} does not exist: pass a .keras file or a base directory "
                             "with numbered version subdirectories.")
    elif hasattr(predictor, "get_weights"):  # a Keras model: wrap it in our own Predictor
        own = Predictor(predictor, **options)
        served = ServedModel(name, Servable(own, probe_outputs(own, output_names),
                                            version=None, owned=True))
    else:
        raise ValueError(f"serve() takes a Predictor, a Keras model or a path; got "
                         f"{type(predictor).__name__}.")
    first = served.current
    metrics = ServerMetrics(
        name,
        first.predictor.max_batch_size if first else options.get("max_batch_size", 256),
        current=lambda: (None, None) if served.current is None else
        (served.current.predictor, served.current.current_version),
        load_failures=lambda: served.load_failures,
    )
    def on_new_predictor(old: Predictor | None) -> None:
        if old is not None:
            metrics.sample_retired(old)
        if freeze_gc:
            gc.unfreeze()  # lets the replaced Predictor's objects be collected
            _freeze_gc()

    served.on_new_predictor = on_new_predictor
    if freeze_gc:
        _freeze_gc()
    logs = RateLimitedLog(log)
    app = ModelApp(served, metrics, max_body_bytes, retry_after_s,
                   max_inflight_bytes=max_inflight_bytes or
                   default_max_inflight_bytes(max_body_bytes),
                   body_timeout_s=body_timeout_s, logs=logs)
    guard = ConnectionGuard(
        max_connections or default_max_connections(),
        {"keepalive_timeout": header_timeout_s, "access_log": None},
        metrics.observe, logs, retry_after_s)
    try:
        handle = ServerHandle(served, app, host, port, watcher, shutdown_timeout_s, guard)
    except BaseException:
        if first is not None and first.owned:
            first.close()
        raise
    if watcher is not None:
        watcher.start()
    return handle
