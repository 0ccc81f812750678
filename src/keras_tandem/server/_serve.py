"""`serve()`: start the HTTP (and gRPC) server on background threads; `ServerHandle` stops it.

Owns the server's lifecycle: deciding what is served (a Predictor, a Keras
model, a `.keras` file, a base directory of versions, or the models of a
TF Serving model config file, re-read while serving when asked to), the
model registry every front end resolves requests through, the event-loop
thread running aiohttp (with the limits of `_limits` and the guarded socket
of `_connections`, and a loop exception handler that rate-limits accept
errors), the gRPC server of `_grpc` when a `grpc_port` is given, the
version watcher threads, and shutting all of it down in order (stop
re-reading the config and watching versions, stop listening, finish
in-flight requests, close the Predictors the server created).
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
from keras_tandem.server._model_config import (
    ConfigWatcher,
    ModelSpec,
    parse_model_config,
)
from keras_tandem.server._registry import ModelRegistry
from keras_tandem.server._repository import (
    LATEST_ONE,
    Servable,
    ServedModel,
    VersionPolicy,
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
        name: the model name in URLs (with a model config file: its first model).
        host: the address it listens on.
        port: the HTTP port it listens on (the real one when 0 was asked for).
        url: `http://host:port`.
        grpc_port: the gRPC port (None when gRPC is off).
    """

    def __init__(self, registry: ModelRegistry, app: ModelApp, host: str, port: int,
                 shutdown_timeout_s: float, guard: ConnectionGuard, name: str | None = None,
                 config_watcher: ConfigWatcher | None = None):
        self.name = name
        self.host = host
        self.grpc_port: int | None = None
        self._registry = registry
        self._app = app
        self._config_watcher = config_watcher
        self._grpc: Any = None
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
    def models(self) -> list[str]:
        """The model names served now."""
        return self._registry.names()

    def _served(self, name: str | None) -> ServedModel | None:
        return self._registry.get(name if name is not None else self.name or "")

    @property
    def version(self) -> int | None:
        """The version of model `name` answering requests naming none (None: none loaded)."""
        served = self._served(None)
        cur = served.current if served is not None else None
        return None if cur is None else cur.current_version

    @property
    def predictor(self) -> Predictor | None:
        """The Predictor of model `name` now answering (it changes when a new architecture
        loads)."""
        served = self._served(None)
        cur = served.current if served is not None else None
        return None if cur is None else cur.predictor

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """A model's TF Serving `model_version_status` list, as `GET /v1/models/NAME`.

        Args:
            name: the model (default: `self.name`).
        """
        served = self._served(name)
        return [] if served is None else served.status()

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

    def _start_grpc(self, grpc_port: int, metrics: ServerMetrics, max_message_bytes: int) -> None:
        try:
            from keras_tandem.server._grpc import GrpcServer
        except ImportError as e:  # tensorflow-serving-api's protos import TensorFlow's
            raise RuntimeError(
                f"gRPC serving needs TensorFlow and tensorflow-serving-api (TF Serving's "
                f"protos), which keras-tandem's default install brings: {e}. Install them "
                "(`pip install keras-tandem`), or serve REST only (no grpc_port / "
                "--grpc-port).") from e

        self._grpc = GrpcServer(self._registry, self.host, grpc_port,
                                observe=metrics.observe, max_message_bytes=max_message_bytes,
                                logs=self._app.logs)
        self.grpc_port = self._grpc.start()

    def stop(self) -> None:
        """Stops listening, answers in-flight requests, stops watching, closes what it made.

        Idempotent. A Predictor passed to `serve()` is not closed: its owner
        closes it.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._config_watcher is not None:
            self._config_watcher.stop()
        self._registry.stop_watchers()
        if self._grpc is not None:
            self._grpc.stop(self._shutdown_timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._registry.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ServerHandle {self.models} at {self.url} version={self.version}>"


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



def _model_from_path(name: str, path: Path, options: dict[str, Any], poll_interval_s: float,
                     policy: VersionPolicy = LATEST_ONE,
                     ) -> tuple[ServedModel, VersionWatcher | None]:
    """A model served from a path, and the watcher of its base directory (None for one file).

    The watcher's first load is left to the caller (after the model's hooks are set).
    """
    if is_saved_model_dir(path):  # one SavedModel, served as version 1
        return ServedModel(name, servable_from_saved_model(path, 1, options)), None
    if path.is_dir():
        served = ServedModel(name, policy=policy)
        return served, VersionWatcher(served, path, options, poll_interval_s)
    if path.is_file():
        if not is_complete_keras_file(path):
            raise ValueError(f"{path} is not a complete .keras file.")
        return ServedModel(name, servable_from_model(load_keras_model(path), 1, options)), None
    raise ValueError(f"{path} does not exist: pass a .keras file, a SavedModel directory or a "
                     "base directory with numbered version subdirectories.")


class _Models:
    """Builds the server's models into its registry, and applies a changed config file."""

    def __init__(self, registry: ModelRegistry, options: dict[str, Any],
                 poll_interval_s: float):
        self.registry = registry
        self.options = options
        self.poll_interval_s = poll_interval_s
        self.specs: dict[str, ModelSpec] = {}

    def add(self, spec: ModelSpec, start_watcher: bool) -> None:
        served, watcher = _model_from_path(spec.name, spec.base_path, self.options,
                                           self.poll_interval_s, spec.policy)
        self.registry.add(served, watcher)
        try:
            if watcher is not None:
                watcher.load_initial()
            served.set_labels(dict(spec.labels))
        except BaseException:
            self.registry.remove(spec.name)
            raise
        self.specs[spec.name] = spec
        if watcher is not None and start_watcher:
            watcher.start()

    def apply(self, specs: list[ModelSpec]) -> None:
        """Brings the registry in line with a new config: removes, adds, updates models.

        A model whose entry did not change is not touched; a model that
        fails to load is logged and left out (the others are applied).
        """
        wanted = {s.name: s for s in specs}
        for name in list(self.specs):
            old = self.specs[name]
            new = wanted.get(name)
            if new is None or new.base_path != old.base_path:
                self.registry.remove(name)
                del self.specs[name]
        for name, spec in wanted.items():
            try:
                if name not in self.specs:
                    log.info("model %r: added from the model config (%s)", name, spec.base_path)
                    self.add(spec, start_watcher=True)
                elif spec != self.specs[name]:
                    self._update(spec)
            except Exception as e:  # noqa: BLE001 - reported; the other models are applied
                log.error("model %r: could not apply its new config: %s: %s", name,
                          type(e).__name__, e)

    def _update(self, spec: ModelSpec) -> None:
        served = self.registry.get(spec.name)
        if served is None:
            return
        old = self.specs[spec.name]
        if spec.policy != old.policy:
            log.info("model %r: version policy %s (was %s)", spec.name, spec.policy, old.policy)
            served.policy = spec.policy
            watcher = self.registry.watcher(spec.name)
            if watcher is not None:
                watcher.load_initial()  # loads what the policy now picks, unloads the rest
        served.set_labels(dict(spec.labels))
        self.specs[spec.name] = spec


def serve(
    predictor: Any = None,
    *,
    name: str | None = None,
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
    model_config_file: str | os.PathLike | None = None,
    model_config_file_poll_wait_seconds: float = 0,
    grpc_port: int | None = None,
) -> ServerHandle:
    """Serves models over HTTP with TensorFlow Serving's REST API (and gRPC), in the background.

    Endpoints, for `MODEL` = `/v1/models/NAME[/versions/V|/labels/L]`:
    `POST MODEL:predict`, `POST MODEL:classify`, `POST MODEL:regress`,
    `GET MODEL`, `GET MODEL/metadata`, `GET /metrics` (also at
    `/monitoring/prometheus/metrics`), `GET /healthz`. Every request to a
    model version goes through its Predictor, so concurrent clients (REST
    and gRPC) are batched together. Answers carry `X-Model-Version` and
    `X-Weight-Version` headers.

    Args:
        predictor: what to serve (or None with `model_config_file`):
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
        name: the model name in URLs (required with `predictor`).
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
        freeze_gc: call `gc.freeze()` once the models are loaded (and again
            after a new Predictor loads), so that Python's full garbage
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
        model_config_file: a TF Serving model config file (text format:
            `model_config_list { config { name: "a" base_path: "/models/a"
            model_platform: "tensorflow" model_version_policy { all {} }
            version_labels { key: "stable" value: 1 } } }`): serves every
            model it lists, instead of `predictor`. A relative `base_path`
            is relative to the working directory, as in TF Serving.
        model_config_file_poll_wait_seconds: re-read the config file this
            often and apply changes (models added or removed, new policies
            or labels) without a restart; 0 reads it once.
        grpc_port: also serve TF Serving's gRPC API (`PredictionService`,
            `ModelService`) on this port (0 picks a free one: see
            `handle.grpc_port`); None: no gRPC.

    Returns:
        A `ServerHandle` (`url`, `port`, `grpc_port`, `version`, `stop()`); a
        context manager.

    Raises:
        ValueError: nothing to serve, or both a model and a config file; a
            path with nothing loadable, or of an unknown kind; an invalid
            config file (naming its line); a limit or timeout that is not
            positive.
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
    if model_config_file_poll_wait_seconds < 0:
        raise ValueError("model_config_file_poll_wait_seconds must be 0 (read once) or "
                         f"positive; got {model_config_file_poll_wait_seconds}.")
    if model_config_file is not None and predictor is not None:
        raise ValueError("Pass either a model to serve or model_config_file, not both (as "
                         "TF Serving's --model_config_file replaces --model_base_path); list "
                         "every model in the config file.")
    if model_config_file is None and predictor is None:
        raise ValueError("Nothing to serve: pass a Predictor, a Keras model or a path (with "
                         "name=...), or model_config_file=... listing the models.")
    if predictor is not None and not name:
        raise ValueError("serve() needs name=... for the model (its name in "
                         "/v1/models/NAME URLs).")
    options = dict(predictor_options or {})
    default_batch = options.get("max_batch_size", 256)
    metrics = ServerMetrics(name or "")

    def on_new_predictor(old: Predictor | None) -> None:
        if freeze_gc:
            gc.unfreeze()  # lets the replaced Predictor's objects be collected
            _freeze_gc()

    def on_add(served: ServedModel) -> None:
        cur = served.current
        metrics.add_model(
            served.name, cur.predictor.max_batch_size if cur else default_batch,
            current=lambda: (None, None) if (c := served.current) is None else
            (c.predictor, c.current_version),
            predictors=served.predictors, load_failures=lambda: served.load_failures)
        served.on_new_predictor = on_new_predictor

        def on_retired(old: Servable) -> None:
            for p in old.predictors():
                metrics.sample_retired(p, served.name)

        served.on_retired = on_retired

    registry = ModelRegistry(on_add=on_add,
                             on_remove=lambda served: metrics.remove_model(served.name))
    models = _Models(registry, options, poll_interval_s)
    config_watcher = None
    try:
        if model_config_file is not None:
            text = _read_config_text(model_config_file)
            specs = parse_model_config(text, str(model_config_file))
            if not specs:
                log.warning("model config %s lists no model; nothing is served until it "
                            "does.", model_config_file)
            for spec in specs:
                models.add(spec, start_watcher=False)
            if model_config_file_poll_wait_seconds > 0:
                config_watcher = ConfigWatcher(model_config_file,
                                               model_config_file_poll_wait_seconds,
                                               models.apply, current=text)
            name = specs[0].name if specs else None
        elif isinstance(predictor, Predictor):
            registry.add(ServedModel(name, Servable(
                predictor, probe_outputs(predictor, output_names), version=None, owned=False)))
        elif isinstance(predictor, (str, os.PathLike)):
            models.add(ModelSpec(name, Path(predictor), LATEST_ONE), start_watcher=False)
        elif hasattr(predictor, "get_weights"):  # a Keras model: wrap it in our own Predictor
            own = Predictor(predictor, **options)
            try:
                outputs = probe_outputs(own, output_names)
            except BaseException:
                own.close()
                raise
            registry.add(ServedModel(name, Servable(own, outputs, version=None, owned=True)))
        else:
            raise ValueError(f"serve() takes a Predictor, a Keras model or a path; got "
                             f"{type(predictor).__name__}.")
    except BaseException:
        registry.close()
        raise
    if freeze_gc:
        _freeze_gc()
    logs = RateLimitedLog(log)
    app = ModelApp(registry, metrics, max_body_bytes, retry_after_s,
                   max_inflight_bytes=max_inflight_bytes or
                   default_max_inflight_bytes(max_body_bytes),
                   body_timeout_s=body_timeout_s, logs=logs)
    guard = ConnectionGuard(
        max_connections or default_max_connections(),
        {"keepalive_timeout": header_timeout_s, "access_log": None},
        metrics.observe, logs, retry_after_s)
    try:
        handle = ServerHandle(registry, app, host, port, shutdown_timeout_s, guard, name,
                              config_watcher)
    except BaseException:
        registry.close()
        raise
    if grpc_port is not None:
        try:
            handle._start_grpc(grpc_port, metrics, max_body_bytes)
        except BaseException:
            handle.stop()
            raise
    for model_name in registry.names():
        watcher = registry.watcher(model_name)
        if watcher is not None:
            watcher.start()
    if config_watcher is not None:
        config_watcher.start()
    return handle


def _read_config_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot read the model config file {path}: {e}") from None
