"""`--model-config-file`: TF Serving's model config file, read and watched.

Owns: parsing TF Serving's text-format `ModelServerConfig`
(`model_config_list { config { name base_path model_platform
model_version_policy version_labels } }`) with the `tensorflow-serving-api`
protos and protobuf's `text_format` (no parser of our own) into `ModelSpec`s,
and `ConfigWatcher`, which re-reads the file every
`--model-config-file-poll-wait-seconds` and hands the new list to a callback
when it changed. What a change does to the served models (add, remove,
new policy or labels) is the server's business (`_serve`); which versions
load is `_repository`'s.

`base_path` is used as written: a relative one is relative to the server's
working directory (as TF Serving does), not to the config file.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keras_tandem.server._repository import VersionPolicy

log = logging.getLogger("keras_tandem.server")

PLATFORMS = ("", "tensorflow", "keras")


@dataclass(frozen=True)
class ModelSpec:
    """One `config { ... }` entry of a model config file.

    Attributes:
        name: the model name in URLs.
        base_path: its base directory (or a `.keras` file / SavedModel directory).
        policy: its `VersionPolicy` (default latest 1).
        labels: its version labels, as sorted `(label, version)` pairs.
    """

    name: str
    base_path: Path
    policy: VersionPolicy
    labels: tuple[tuple[str, int], ...] = ()


def parse_model_config(text: str, source: str = "<model config>") -> list[ModelSpec]:
    """Parses TF Serving's text-format `ModelServerConfig`.

    Args:
        text: the file's contents.
        source: the file name, for error messages.

    Returns:
        One `ModelSpec` per `config` entry, in file order.

    Raises:
        ValueError: a syntax error (with the file, line and column), no
            `model_config_list`, a missing `name` / `base_path`, a duplicate
            name, an unsupported `model_platform`, or a bad version policy.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        where = f"{source}:{e.GetLine()}:{e.GetColumn()}" if e.GetLine() else source
        raise ValueError(f"{where}: not a valid TF Serving model config: {e}. Expected "
                         'model_config_list { config { name: "m" base_path: "/models/m" '
                         'model_platform: "tensorflow" } }.') from None
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{source}: no model_config_list {{ ... }} found; tandem serve reads "
                         "TF Serving's model_config_list format (custom_model_config is not "
                         "supported).")
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(config.model_config_list.config):
        where = f"{source}: config #{i + 1}"
        if not entry.name:
            raise ValueError(f"{where} has no name: add `name: \"my_model\"`.")
        where = f"{source}: model {entry.name!r}"
        if entry.name in seen:
            raise ValueError(f"{where} is configured twice; model names must be unique.")
        seen.add(entry.name)
        if not entry.base_path:
            raise ValueError(f"{where} has no base_path: add `base_path: \"/models/"
                             f"{entry.name}\"` (the directory holding 1/, 2/, ...).")
        if entry.model_platform not in PLATFORMS:
            raise ValueError(f"{where}: model_platform {entry.model_platform!r} is not "
                             "supported; use \"tensorflow\" (SavedModels and .keras files).")
        try:
            policy = policy_from_proto(entry.model_version_policy)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        labels = tuple(sorted((str(k), int(v)) for k, v in entry.version_labels.items()))
        specs.append(ModelSpec(entry.name, Path(entry.base_path), policy, labels))
    return specs


def policy_from_proto(proto: Any) -> VersionPolicy:
    """A `VersionPolicy` from TF Serving's `model_version_policy` message.

    Args:
        proto: a `FileSystemStoragePathSourceConfig.ServableVersionPolicy`.

    Returns:
        The policy; latest 1 when none is set, as TF Serving.
    """
    choice = proto.WhichOneof("policy_choice")
    if choice is None:
        return VersionPolicy()
    if choice == "latest":
        n = proto.latest.num_versions
        return VersionPolicy("latest", num_versions=n or 1)
    if choice == "all":
        return VersionPolicy("all")
    return VersionPolicy("specific", versions=frozenset(int(v) for v in proto.specific.versions))


def read_model_config(path: str | os.PathLike) -> list[ModelSpec]:
    """Reads and parses a model config file; see `parse_model_config`.

    Raises:
        ValueError: the file cannot be read or is not a valid config.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"Cannot read the model config file {path}: {e}") from None
    return parse_model_config(text, str(path))


class ConfigWatcher:
    """Re-reads a model config file every `poll_wait_s` seconds; applies it when it changed.

    A file that no longer parses is logged and ignored: the models keep
    serving as configured before.

    Args:
        path: the config file.
        poll_wait_s: seconds between reads.
        apply: called (on the watcher's thread) with the new list of `ModelSpec`s.
        current: the text the server started with (changes are relative to it).
    """

    def __init__(self, path: str | os.PathLike, poll_wait_s: float,
                 apply: Callable[[list[ModelSpec]], None], current: str | None = None):
        self.path = Path(path)
        self.poll_wait_s = float(poll_wait_s)
        self.apply = apply
        self._text = current
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0

    def check_once(self) -> bool:
        """Reads the file once; applies it if it changed. Returns whether it was applied."""
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            log.error("model config %s: cannot read it (%s); keeping the models as they are.",
                      self.path, e)
            return False
        if text == self._text:
            return False
        try:
            specs = parse_model_config(text, str(self.path))
        except ValueError as e:
            log.error("%s; keeping the models as they are.", e)
            self._text = text  # reported once, until it changes again
            return False
        self._text = text
        log.info("model config %s changed: %d model(s)", self.path, len(specs))
        self.apply(specs)
        self.reloads += 1
        return True

    def start(self) -> None:
        """Starts polling on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="keras-tandem-model-config",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stops polling (waits for a reload in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_wait_s):
            try:
                self.check_once()
            except Exception:  # the watcher must outlive one bad reload
                log.exception("model config %s: applying it failed", self.path)
