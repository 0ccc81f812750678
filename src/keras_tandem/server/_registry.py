"""The models a server serves, by name.

Owns `ModelRegistry`: name -> `ServedModel` (and the `VersionWatcher` that
loads its versions), the `ModelLookup` that REST (`_app`) and gRPC
(`_grpc`) resolve every request through. Models are added and removed
while the server runs (a reloaded `--model-config-file`): a removed name
stops resolving at once, and its Predictors close after answering what is
queued on them, so no request to any model is dropped. Which versions of a
model are loaded is its watcher's business (`_repository`); the config
file's format is `_model_config`'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from keras_tandem.server._lookup import ServableNotFound, resolve_in, status_in
from keras_tandem.server._repository import Servable, ServedModel, VersionWatcher

log = logging.getLogger("keras_tandem.server")


class ModelRegistry:
    """Name -> served model; a `ModelLookup`.

    Args:
        on_add: called with each `ServedModel` added (metrics, hooks).
        on_remove: called with each `ServedModel` removed, after it closed.
    """

    def __init__(self, on_add: Callable[[ServedModel], None] | None = None,
                 on_remove: Callable[[ServedModel], None] | None = None):
        self._models: dict[str, ServedModel] = {}
        self._watchers: dict[str, VersionWatcher] = {}
        self._lock = threading.Lock()
        self.on_add = on_add
        self.on_remove = on_remove

    def add(self, served: ServedModel, watcher: VersionWatcher | None = None) -> None:
        """Serves `served` under its name (its watcher, if any, must be started by the caller).

        Raises:
            ValueError: the name is served already.
        """
        with self._lock:
            if served.name in self._models:
                raise ValueError(f"A model named {served.name!r} is served already; model "
                                 "names must be unique.")
            self._models[served.name] = served
            if watcher is not None:
                self._watchers[served.name] = watcher
        if self.on_add is not None:
            self.on_add(served)

    def remove(self, name: str) -> ServedModel | None:
        """Stops serving `name`: stops its watcher, then closes its Predictors (they drain)."""
        with self._lock:
            served = self._models.pop(name, None)
            watcher = self._watchers.pop(name, None)
        if served is None:
            return None
        if watcher is not None:
            watcher.stop()
        served.close()
        log.info("model %r: no longer served", name)
        if self.on_remove is not None:
            self.on_remove(served)
        return served

    def get(self, name: str) -> ServedModel | None:
        """The served model of that name, or None."""
        return self._models.get(name)

    def watcher(self, name: str) -> VersionWatcher | None:
        """The watcher loading `name`'s versions, or None (a file or a Predictor)."""
        return self._watchers.get(name)

    def models(self) -> list[ServedModel]:
        """Every served model, in the order they were added."""
        with self._lock:
            return list(self._models.values())

    def names(self) -> list[str]:
        """The model names served now."""
        with self._lock:
            return list(self._models)

    def resolve(self, name: str, version: int | None = None,
                label: str | None = None) -> tuple[ServedModel, Servable]:
        """The servable answering `name` (newest, `version` or `label`); see `ModelLookup`.

        Raises:
            ServableNotFound: unknown model or version, or none loaded yet
                (`unavailable`); `UnknownLabel` for an unknown label.
        """
        return resolve_in(self._models.get(name), name, version, label)

    def status(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """TF Serving's `model_version_status` entries of `name`; see `ModelLookup`."""
        return status_in(self._models.get(name), name, version)

    def stop_watchers(self) -> None:
        """Stops every watcher (waits for loads in progress)."""
        with self._lock:
            watchers = list(self._watchers.values())
        for w in watchers:
            w.stop()

    def close(self) -> None:
        """Stops the watchers, then closes every model's Predictors that the server made."""
        self.stop_watchers()
        for served in self.models():
            served.close()


__all__ = ["ModelRegistry", "ServableNotFound"]
