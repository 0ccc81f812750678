"""What the server serves, and loading new versions of it.

Owns:
- `Servable`: one Predictor and what the server knows about it (inputs,
  outputs, the model version each of its weight versions belongs to).
- `ServedModel`: the versions of one model loaded now (the newest answers
  requests naming none), its version labels, and the TF Serving state
  (`LOADING`, `AVAILABLE`, `END`) of every version seen.
- `VersionPolicy`: TF Serving's `latest { num_versions }` / `all` / `specific`.
- `VersionWatcher`: polls a TF Serving-style base directory (`BASE/1/model.keras`,
  `BASE/2/saved_model.pb`, ...), loads the versions its policy picks once their
  files are complete, warms them up (a probe, then the version's TF Serving
  warm-up records) and makes them AVAILABLE, then unloads the versions the
  policy dropped (their Predictors answer what is queued, then close). A
  version replacing one of the same architecture takes over its Predictor
  with `update_weights`; otherwise it gets a new Predictor (always for a
  SavedModel, whose weights live in its functions). A version that fails to
  load is reported and the loaded ones keep serving; a version directory
  with neither format is warned about.

SavedModels become Keras models in `_savedmodel`.

All prediction work stays in `Predictor`; this module only decides which
Predictor answers and what to call its versions.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keras_tandem.server._protocol import OutputSpec, version_status
from keras_tandem.server._savedmodel import (
    DEFAULT_SIGNATURE,
    dir_signature,
    is_saved_model_dir,
    signature_def_doc,
    signature_models,
)
from keras_tandem.server._warmup import replay_warmup
from keras_tandem.serving.predictor import Predictor

log = logging.getLogger("keras_tandem.server")

LOADING, AVAILABLE, END = "LOADING", "AVAILABLE", "END"


def probe_outputs(predictor: Predictor, names: list[str] | None = None) -> OutputSpec:
    """Runs one all-zeros example (empty strings for strings) and describes the outputs.

    This doubles as the warm-up of a new Predictor: it proves the forward
    pass runs, end to end, before any client is sent to it.

    Args:
        predictor: the Predictor to probe.
        names: names for a single output or a list of outputs (default:
            the names in `predictor.outputs`).

    Returns:
        The `OutputSpec` of one example's outputs.
    """
    example = {f.name: np.full(f.shape, b"", object) if f.is_string else np.zeros(f.shape, f.dtype)
               for f in predictor.inputs}
    return OutputSpec.from_specs(predictor.predict(example), predictor.outputs, names)


def architecture_of(model: Any) -> str:
    """A fingerprint of a Keras model's architecture (config and weight shapes)."""
    try:
        config = model.get_config()
    except Exception:  # noqa: BLE001 - an unserializable config: never "the same"
        config = {"unique": id(model)}
    shapes = [(tuple(w.shape), str(w.dtype)) for w in model.weights]
    return json.dumps([config, shapes], sort_keys=True, default=str)


class Servable:
    """One Predictor and the server's view of it.

    Args:
        predictor: the Predictor that answers.
        outputs: its `OutputSpec`.
        version: the model version it serves (a directory number), or None to
            report the Predictor's own weight version (a Predictor that
            training updates in-process).
        owned: whether the server created it (and so closes it).
        architecture: the fingerprint of the model it was built from (None:
            never swapped by weights, as for a SavedModel).
        signatures: the servables of a SavedModel's other signatures, by name.
        signature_def: the SavedModel's own `signature_def` map, for metadata.
    """

    def __init__(self, predictor: Predictor, outputs: OutputSpec, version: int | None,
                 owned: bool, architecture: str | None = None,
                 signatures: dict[str, Servable] | None = None,
                 signature_def: dict[str, Any] | None = None):
        self.predictor = predictor
        self.signatures = signatures or {}
        self.signature_def = signature_def
        self.inputs = predictor.inputs
        self.outputs = outputs
        self.owned = owned
        self.architecture = architecture
        self.follows_weights = version is None
        self.version = version
        self._labels = {predictor.version: version}  # weight version -> model version
        self._pending: int | None = None

    @property
    def current_version(self) -> int:
        """The model version answering new requests."""
        return self.predictor.version if self.follows_weights else self.version

    def label(self, weight_version: int) -> int:
        """The model version that a weight version of this Predictor belongs to."""
        if self.follows_weights:
            return weight_version
        v = self._labels.get(weight_version)
        if v is None:  # answered by weights whose swap is being recorded right now
            v = self._pending if self._pending is not None else self.version
        return v

    def for_signature(self, name: str | None) -> Servable | None:
        """The servable of signature `name` (None or "": the default); None if unknown."""
        if name in (None, "", DEFAULT_SIGNATURE):
            return self
        return self.signatures.get(name)

    @property
    def signature_names(self) -> list[str]:
        """The signature names a request may choose."""
        return [DEFAULT_SIGNATURE, *sorted(self.signatures)]

    def predictors(self) -> list[Predictor]:
        """Its Predictors: the default signature's, then the others'."""
        return [self.predictor, *(s.predictor for s in self.signatures.values())]

    def close(self) -> None:
        """Closes its Predictors (each answers everything already queued on it)."""
        for predictor in self.predictors():
            predictor.close()

    def swap_weights(self, model: Any, version: int) -> int:
        """Swaps `model`'s weights in as `version`; returns the new weight version."""
        self._pending = version
        try:
            weight_version = self.predictor.update_weights(model)
            self._labels[weight_version] = version
            self.version = version
        finally:
            self._pending = None
        return weight_version


@dataclass
class _VersionState:
    state: str
    error_code: str = "OK"
    error_message: str = ""


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a base directory are served: TF Serving's `model_version_policy`.

    Args:
        kind: "latest" (the `num_versions` newest), "all", or "specific"
            (exactly `versions`).
        num_versions: how many versions "latest" serves.
        versions: the versions "specific" serves.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(f"Unknown version policy {self.kind!r}: use latest, all or specific.")
        if self.kind == "latest" and self.num_versions < 1:
            raise ValueError(f"latest {{ num_versions: {self.num_versions} }}: num_versions "
                             "must be at least 1.")
        if self.kind == "specific" and not self.versions:
            raise ValueError("specific {} names no version: add `versions: N` lines.")

    def select(self, versions: Any) -> set[int]:
        """The versions of `versions` that this policy serves."""
        versions = set(versions)
        if self.kind == "all":
            return versions
        if self.kind == "specific":
            return versions & set(self.versions)
        return set(sorted(versions, reverse=True)[:self.num_versions])

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {{ num_versions: {self.num_versions} }}"
        if self.kind == "all":
            return "all {}"
        return "specific { " + " ".join(f"versions: {v}" for v in sorted(self.versions)) + " }"


LATEST_ONE = VersionPolicy()


class ServedModel:
    """The loaded versions of one model name, its labels, and every version's state.

    Several versions may be loaded at once (a version policy such as
    `latest { num_versions: 2 }` or `all {}`); each is a `Servable`, and the
    newest answers requests that name no version. A `Servable` made from a
    caller's Predictor follows its weight versions instead.

    Args:
        name: the model name in URLs.
        servable: what serves at first (None until a first version loads).
        policy: the `VersionPolicy` its watcher applies (default latest 1).
    """

    def __init__(self, name: str, servable: Servable | None = None,
                 policy: VersionPolicy = LATEST_ONE):
        self.name = name
        self.policy = policy
        self.load_failures = 0
        self._states: dict[int, _VersionState] = {}
        self._loaded: dict[int, Servable] = {}  # AVAILABLE model version -> servable
        self._follower: Servable | None = None  # a caller's Predictor: follows its weights
        self._newest: Servable | None = None  # the newest loaded version's servable
        self._labels: dict[str, int] = {}
        self._pending_labels: dict[str, int] = {}  # wait for their version to be AVAILABLE
        self._lock = threading.Lock()
        # Called (on the loading thread) after a different Predictor took
        # over, with the one it replaced (already closed) or None.
        self.on_new_predictor: Callable[[Predictor | None], None] | None = None
        # Called after a servable was unloaded and closed (its last stats).
        self.on_retired: Callable[[Servable], None] | None = None
        if servable is not None:
            if servable.follows_weights:
                self._follower = servable
            else:
                self._loaded[servable.version] = servable
                self._newest = servable
                self._states[servable.version] = _VersionState(AVAILABLE)

    @property
    def current(self) -> Servable | None:
        """The servable answering requests that name no version (the newest loaded)."""
        return self._follower if self._follower is not None else self._newest

    def _set_newest(self) -> None:
        # Under self._lock; `current` reads `_newest` without it (one attribute read).
        self._newest = self._loaded[max(self._loaded)] if self._loaded else None

    def get(self, version: int) -> Servable | None:
        """The servable of a loaded model version, or None."""
        follower = self._follower
        if follower is not None:
            return follower if follower.current_version == version else None
        return self._loaded.get(version)

    @property
    def loaded_versions(self) -> list[int]:
        """The model versions loaded now (AVAILABLE), newest first."""
        if self._follower is not None:
            return [self._follower.current_version]
        with self._lock:
            return sorted(self._loaded, reverse=True)

    def servables(self) -> list[Servable]:
        """Every distinct servable loaded now (newest first)."""
        if self._follower is not None:
            return [self._follower]
        with self._lock:
            out: list[Servable] = []
            for v in sorted(self._loaded, reverse=True):
                if all(s is not self._loaded[v] for s in out):
                    out.append(self._loaded[v])
            return out

    def predictors(self) -> list[Predictor]:
        """The Predictors of every loaded version and signature."""
        return [p for s in self.servables() for p in s.predictors()]

    # ------------------------------------------------------------ labels

    @property
    def labels(self) -> dict[str, int]:
        """Version labels now in effect (label -> version)."""
        with self._lock:
            return dict(self._labels)

    def set_labels(self, labels: dict[str, int]) -> None:
        """Sets the version labels (TF Serving's `version_labels`).

        A label naming a version that is not AVAILABLE waits until it is
        (as TF Serving does at start-up); until then a label moved from an
        available version keeps pointing there, and a new label is unknown.
        """
        with self._lock:
            self._pending_labels = {}
            kept = {}
            for label, version in labels.items():
                if version in self._loaded or (
                        self._follower is not None
                        and self._follower.current_version == version):
                    kept[label] = version
                else:
                    self._pending_labels[label] = version
                    if label in self._labels:
                        kept[label] = self._labels[label]
            self._labels = kept
            pending = dict(self._pending_labels)
        for label, version in pending.items():
            log.warning("model %r: request to assign label %r to version %s, which is not "
                        "currently available for inference; the label applies once it loads.",
                        self.name, label, version)

    def _apply_pending_labels(self) -> None:
        # Under self._lock.
        for label, version in list(self._pending_labels.items()):
            if version in self._loaded:
                self._labels[label] = version
                del self._pending_labels[label]

    def version_of_label(self, label: str) -> int | None:
        """The version a label names (None: no such label)."""
        with self._lock:
            return self._labels.get(label)

    # ------------------------------------------------------------ states

    def set_state(self, version: int, state: str, error_code: str = "OK",
                  error_message: str = "") -> None:
        """Records a version's TF Serving state."""
        with self._lock:
            self._states[version] = _VersionState(state, error_code, error_message)

    def state_of(self, version: int) -> str | None:
        """A version's state, or None if never seen."""
        with self._lock:
            s = self._states.get(version)
            return s.state if s else None

    def fail(self, version: int, error: BaseException) -> None:
        """Records a failed load of `version` (the served versions are untouched)."""
        message = f"{type(error).__name__}: {error}"
        with self._lock:
            self.load_failures += 1
            self._states[version] = _VersionState(END, "UNKNOWN", message)
        log.error("model %r version %s failed to load; still serving %s. %s",
                  self.name, version, self.loaded_versions or None, message)

    def status(self, version: int | None = None) -> list[dict[str, Any]]:
        """TF Serving's `model_version_status` list (newest first).

        Args:
            version: only this version (empty list if unknown).
        """
        cur = self._follower
        if cur is not None:
            entries = [version_status(cur.current_version, AVAILABLE)]
        else:
            with self._lock:
                entries = [version_status(v, s.state, s.error_code, s.error_message)
                           for v, s in sorted(self._states.items(), reverse=True)]
        if version is not None:
            entries = [e for e in entries if e["version"] == str(version)]
        return entries

    # -------------------------------------------------- loading, unloading

    def install(self, servable: Servable, replaced_version: int | None = None) -> None:
        """Makes `servable` AVAILABLE as its version; retires the version it replaces.

        Args:
            servable: the new servable (or the current one, after a weight swap).
            replaced_version: a version to unload now (END); its Predictors
                are closed unless `servable` still uses them.
        """
        if servable.follows_weights:
            old = self._follower
            self._follower = servable
            self._retire(old, servable)
            return
        with self._lock:
            self._loaded[servable.version] = servable
            self._states[servable.version] = _VersionState(AVAILABLE)
            old = None
            if replaced_version is not None and replaced_version != servable.version:
                old = self._loaded.pop(replaced_version, None)
                self._states[replaced_version] = _VersionState(END)
            self._set_newest()
            self._apply_pending_labels()
        self._retire(old, servable)

    def unload(self, version: int) -> None:
        """Unloads a version (END): new requests no longer reach it; queued ones are answered."""
        with self._lock:
            old = self._loaded.pop(version, None)
            if old is None:
                return
            self._set_newest()
            self._states[version] = _VersionState(END)
        log.info("model %r: unloaded version %s", self.name, version)
        self._retire(old, None)

    def close(self) -> None:
        """Unloads every version, closing the Predictors the server created."""
        with self._lock:
            olds = list(self._loaded.values())
            self._loaded = {}
            self._newest = None
            follower, self._follower = self._follower, None
        for s in {id(s): s for s in [*olds, follower] if s is not None}.values():
            if s.owned:
                s.close()

    def _retire(self, old: Servable | None, new: Servable | None) -> None:
        if old is not None and new is not None and old.predictor is new.predictor:
            return
        with self._lock:
            in_use = old is not None and any(s is old for s in self._loaded.values())
        if old is not None and old.owned and not in_use:
            old.close()  # answers everything already queued on it
            if self.on_retired is not None:
                self.on_retired(old)
        if new is not None and self.on_new_predictor is not None:
            self.on_new_predictor(None if old is None else old.predictor)


def find_model_file(version_dir: Path) -> Path | None:
    """`model.keras` in a version directory, else its only `*.keras` file."""
    f = version_dir / "model.keras"
    if f.is_file():
        return f
    found = sorted(version_dir.glob("*.keras"))
    return found[0] if len(found) == 1 else None


def is_complete_keras_file(path: Path) -> bool:
    """Whether `path` is a whole `.keras` archive (a zip whose entries all check)."""
    try:
        with zipfile.ZipFile(path) as z:
            return "config.json" in z.namelist() and z.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def find_version_model(version_dir: Path) -> Path | None:
    """A version directory's model: its `.keras` file, else the directory if a SavedModel."""
    f = find_model_file(version_dir)
    if f is None and is_saved_model_dir(version_dir):
        return version_dir
    return f


def is_complete_model(path: Path) -> bool:
    """Whether `path` is a complete `.keras` archive or a SavedModel directory."""
    return is_saved_model_dir(path) if path.is_dir() else is_complete_keras_file(path)


def locate_model(path: str | os.PathLike) -> tuple[Path, int]:
    """The model that `serve(path)` loads first, and its model version.

    Args:
        path: a `.keras` file or a SavedModel directory (version 1), or a base
            directory of numbered version subdirectories (`BASE/1/model.keras`,
            `BASE/00000002/saved_model.pb`, ...): its newest version holding a
            complete model.

    Returns:
        `(file or SavedModel directory, version)`.

    Raises:
        ValueError: nothing servable at `path`, saying what was found there.
    """
    path = Path(path)
    if path.is_file():
        if not is_complete_keras_file(path):
            raise ValueError(f"{path} is not a complete .keras file (a zip archive with a "
                             "config.json, as `model.save('model.keras')` writes).")
        return path, 1
    if not path.is_dir():
        raise ValueError(f"{path} does not exist: pass a .keras file or a base directory "
                         "with numbered version subdirectories.")
    if is_saved_model_dir(path):
        return path, 1
    versions = sorted(((int(e.name), e.name) for e in os.scandir(path)
                       if e.name.isdigit() and e.is_dir()), reverse=True)
    for v, name in versions:
        f = find_version_model(path / name)
        if f is not None and is_complete_model(f):
            return f, v
    raise ValueError(f"{path} has no numbered version subdirectory with a complete .keras file "
                     f"or a SavedModel (found versions {sorted(v for v, _ in versions)}); "
                     f"expected {path}/1/model.keras or {path}/1/saved_model.pb.")


def load_keras_model(path: Path) -> Any:
    """Loads a `.keras` file with `safe_mode=True` (no code from the file runs).

    A SavedModel directory gives the Keras model of its `serving_default`
    signature (see `servable_from_saved_model` for all of its signatures).
    """
    import keras

    if Path(path).is_dir():
        models = signature_models(path)
        if DEFAULT_SIGNATURE not in models:
            raise ValueError(f"The SavedModel at {path} has no {DEFAULT_SIGNATURE!r} signature "
                             f"(it has {sorted(models)}).")
        return models[DEFAULT_SIGNATURE]
    return keras.saving.load_model(str(path), compile=False, safe_mode=True)


def servable_from_model(model: Any, version: int,
                        predictor_options: dict[str, Any]) -> Servable:
    """A new, warmed-up Predictor for a loaded Keras model.

    Args:
        model: the loaded model.
        version: its model version.
        predictor_options: keyword arguments for `Predictor`.

    Returns:
        A `Servable` owned by the server.
    """
    predictor = Predictor(model, **predictor_options)
    try:
        outputs = probe_outputs(predictor)
    except BaseException:
        predictor.close()
        raise
    return Servable(predictor, outputs, version, owned=True,
                    architecture=architecture_of(model))


def servable_from_saved_model(path: Path, version: int,
                              predictor_options: dict[str, Any]) -> Servable:
    """New, warmed-up Predictors for every signature of a SavedModel.

    Args:
        path: the SavedModel directory.
        version: its model version.
        predictor_options: keyword arguments for each `Predictor`.

    Returns:
        A `Servable` owned by the server, for `serving_default`, holding the
        other signatures' servables in `signatures`.

    Raises:
        ValueError: no `serving_default` signature, or a signature without a
            batch dimension.
    """
    models = signature_models(path)
    if DEFAULT_SIGNATURE not in models:
        raise ValueError(f"The SavedModel at {path} has no {DEFAULT_SIGNATURE!r} signature "
                         f"(it has {sorted(models)}); TF Serving's clients call that one.")
    built: dict[str, Servable] = {}
    try:
        for name, model in models.items():
            built[name] = servable_from_model(model, version, predictor_options)
            built[name].architecture = None  # weights are inside its functions
    except BaseException:
        for s in built.values():
            s.predictor.close()
        raise
    main = built.pop(DEFAULT_SIGNATURE)
    main.signatures = built
    main.signature_def = signature_def_doc(path)
    return main


def load_servable(path: Path, version: int, predictor_options: dict[str, Any]) -> Servable:
    """A new servable for a `.keras` file or a SavedModel directory."""
    if path.is_dir():
        return servable_from_saved_model(path, version, predictor_options)
    return servable_from_model(load_keras_model(path), version, predictor_options)


class VersionWatcher:
    """Polls a base directory of numbered versions and serves the newest.

    A version is loaded once its model is complete: a valid `.keras` zip, or
    a directory holding `saved_model.pb`, whose size and modification time
    (of all its files, for a SavedModel) did not change between two polls.
    Version names are numbers of any width (`00000123` is version 123). A
    version directory holding neither is named in a warning, once.
    A file that is not a valid archive is reported as failed only once it
    has not changed for `settle_s` (a writer may pause); if it changes
    later, it is tried again. Writers should still prefer writing elsewhere
    and renaming the version directory into place.

    Args:
        served: the `ServedModel` to update.
        base_dir: the directory holding `1/`, `2/`, ...
        predictor_options: keyword arguments for each new `Predictor`.
        poll_interval_s: seconds between scans.
        settle_s: how long an invalid archive must stay unchanged before it
            is reported as failed (default: the larger of 2 s and 3 polls).
    """

    def __init__(self, served: ServedModel, base_dir: str | os.PathLike,
                 predictor_options: dict[str, Any], poll_interval_s: float = 1.0,
                 settle_s: float | None = None):
        self.served = served
        self.base_dir = Path(base_dir)
        self.predictor_options = predictor_options
        self.poll_interval_s = poll_interval_s
        self.settle_s = max(2.0, 3 * poll_interval_s) if settle_s is None else settle_s
        self._seen: dict[int, tuple[int, int]] = {}  # version -> (size, mtime_ns) last poll
        self._failed: dict[int, tuple[int, int]] = {}  # version -> signature that failed
        self._warned: set[str] = set()  # version directories warned about as holding no model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()  # one scan or load at a time (poll thread, config reload)

    def scan(self) -> dict[int, Path | None]:
        """Numbered version directories and their models (None: none yet).

        A model is a `.keras` file or, for a SavedModel, the version directory.
        """
        found: dict[int, Path | None] = {}
        try:
            entries = list(os.scandir(self.base_dir))
        except OSError:
            return found
        for e in entries:
            if e.name.isdigit() and e.is_dir():
                found[int(e.name)] = model = find_version_model(Path(e.path))
                if model is None and e.path not in self._warned:
                    self._warned.add(e.path)
                    log.warning("model %r: version directory %s holds neither a .keras file "
                                "(model.keras) nor a SavedModel (saved_model.pb); it is not "
                                "served until it does.", self.served.name, e.path)
        return found

    def load_initial(self) -> None:
        """Loads the versions the policy serves now (complete ones; older on a failure).

        Also what a policy change calls: versions the new policy picks are
        loaded, those it dropped unloaded.
        """
        with self._busy:
            self._load_complete()

    def _load_complete(self) -> None:
        versions = self.scan()
        if not versions:
            log.warning("model %r: %s has no numbered version subdirectory (such as "
                        "%s/1/model.keras or %s/1/saved_model.pb); nothing is served until "
                        "one appears.", self.served.name, self.base_dir, self.base_dir,
                        self.base_dir)
        candidates = {v: (path, None) for v, path in versions.items() if path is not None}
        self._apply_policy(candidates, report_incomplete=False)

    def poll_once(self) -> None:
        """One scan: loads what the policy now serves, then unloads what it no longer does.

        A new version is loaded once it is complete and unchanged since the
        previous scan. A version that failed to load is not tried again
        until its files change; the versions already loaded keep serving.
        """
        with self._busy:
            self._poll()

    def _poll(self) -> None:
        served = self.served
        loaded = served.loaded_versions
        policy = served.policy
        # Versions that could enter the policy: for latest N with N loaded, only
        # newer ones (an older version showing up late is never loaded).
        floor = (loaded[policy.num_versions - 1]
                 if policy.kind == "latest" and len(loaded) >= policy.num_versions else None)
        versions = self.scan()
        seen, self._seen = self._seen, {}
        candidates: dict[int, tuple[Path, tuple[int, int] | None]] = {}
        for v, path in versions.items():
            if path is None or v in loaded or (floor is not None and v <= floor):
                continue
            if policy.kind == "specific" and v not in policy.versions:
                continue
            sig = _signature(path)
            if sig is None:
                continue
            self._seen[v] = sig
            if seen.get(v) != sig or self._failed.get(v) == sig:
                continue  # still changing, or this exact file already failed
            candidates[v] = (path, sig)
        self._apply_policy(candidates, report_incomplete=True)

    def _apply_policy(self, candidates: dict[int, tuple[Path, tuple[int, int] | None]],
                      report_incomplete: bool) -> None:
        """Loads the versions the policy picks from the candidates and the loaded ones, then
        unloads the rest.

        A candidate's files are checked only once the policy picks it (a
        `.keras` check reads the whole archive). For `latest`, a version that
        is incomplete or fails to load leaves room for the next older one.
        Versions are unloaded only after the new ones loaded, so a version
        answers throughout.

        Args:
            candidates: version -> (its model path, its files' signature or None).
            report_incomplete: report an invalid archive that stopped changing
                for `settle_s` as a failed load (polls); else skip it quietly.
        """
        served = self.served
        skipped: set[int] = set()
        while True:
            loaded = set(served.loaded_versions)
            aspired = served.policy.select((loaded | set(candidates)) - skipped)
            to_load = sorted(aspired - loaded, reverse=True)
            if not to_load:
                break
            v = to_load[0]
            path, sig = candidates[v]
            if not is_complete_model(path):
                skipped.add(v)
                if report_incomplete and sig is not None and (
                        time.time() - sig[1] / 1e9 >= self.settle_s):
                    self._failed[v] = sig
                    served.fail(v, ValueError(
                        f"{path} is not a complete .keras archive (its size stopped changing, "
                        "but it is not a valid zip with a config.json)."))
                continue  # else probably still being written: look again later
            if not self._load(v, path, sig if sig is not None else _signature(path),
                              sorted(loaded - aspired)):
                skipped.add(v)
        for v in sorted(set(served.loaded_versions) - aspired):
            served.unload(v)

    def _load(self, version: int, path: Path, sig: tuple[int, int] | None,
              retiring: list[int] | tuple[int, ...] = ()) -> bool:
        """Loads one version and makes it AVAILABLE; False (reported) when it fails.

        A `.keras` version with the architecture of a version leaving the
        policy takes over that version's Predictor by swapping the weights.
        """
        served = self.served
        previous = served.state_of(version)
        served.set_state(version, LOADING)
        log.info("model %r: loading version %s from %s", served.name, version, path)
        try:
            if path.is_dir():
                new = servable_from_saved_model(path, version, self.predictor_options)
                self._warm_up(new, path)
                served.install(new)
                return self._loaded(version, previous)
            model = load_keras_model(path)
            arch = architecture_of(model)
            for old_version in retiring:
                cur = served.get(old_version)
                if cur is not None and cur.owned and cur.architecture == arch:
                    cur.swap_weights(model, version)
                    served.install(cur, old_version)
                    return self._loaded(version, previous)
            new = servable_from_model(model, version, self.predictor_options)
            self._warm_up(new, path.parent)
            served.install(new)
        except Exception as e:  # noqa: BLE001 - reported; the loaded versions keep serving
            if sig is not None:
                self._failed[version] = sig
            served.fail(version, e)
            return False
        return self._loaded(version, previous)

    def _warm_up(self, servable: Servable, version_dir: Path) -> None:
        try:
            replay_warmup(servable, version_dir)
        except BaseException:
            servable.close()
            raise

    def _loaded(self, version: int, previous: str | None) -> bool:
        if previous is None or previous != AVAILABLE:
            log.info("model %r: now serving version %s", self.served.name, version)
        return True

    def start(self) -> None:
        """Starts polling on a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="keras-tandem-watcher",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops polling (waits for a load in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # the watcher must outlive one bad scan
                log.exception("model %r: scanning %s failed", self.served.name, self.base_dir)


def _signature(path: Path) -> tuple[int, int] | None:
    if path.is_dir():
        return dir_signature(path)
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)

