"""`train_in_background`: `model.fit` on its own thread, with a handle to watch and stop it.

Separation of concerns:
- `TrainingRun` (this module) owns the training thread and its lifecycle:
  progress, `stop()`, `join()` (which re-raises a training error), and the
  callbacks that feed them.
- `PublishWeights` (publish.py) owns publishing weights to predictors;
  `train_in_background` only wires one in when `publish_to` is given.
- Keras owns the loop itself, and checkpoints (`BackupAndRestore`,
  `ModelCheckpoint`) when `checkpoint_dir` is given; under a
  `MultiWorkerMirroredStrategy`, `_multiworker.fit` owns the loop and the
  checkpoints instead (Keras 3's `fit` fails there).
- `_inputs.py` turns arrays and generators into datasets, for both loops.
  On Keras' JAX and PyTorch backends TensorFlow is not imported: arrays and
  generators go to `fit` as they are (Keras' own data adapters), and there
  is no multi-worker loop (it is `tf.distribute`'s).

The tf.data teardown trap: destroying a used tf.data iterator while autotune
is on can stall until autotune's next wake-up (up to seconds). Keras drops an
epoch's iterator when the next epoch starts and the last one when `fit`
returns. So (1) the datasets built from arrays and generators (`_inputs.py`)
have autotune off, which removes the stall, and (2) `join()` and `done` are
released from `on_train_end`, after the last callback work but before `fit`
frees its iterator, so a user's own autotuned `tf.data.Dataset` cannot delay
them at the end (between epochs it still can: that is inside its `fit`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras

from keras_tandem.cluster.tf_config import cluster_position
from keras_tandem.training.publish import PublishWeights

_now = time.perf_counter
_LIVE: weakref.WeakSet[TrainingRun] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # A daemon thread still inside TensorFlow at interpreter teardown can crash
    # the process, so stop every run and give its thread time to leave.
    for run in list(_LIVE):
        run.stop()
        run.thread.join(10.0)


@dataclasses.dataclass(frozen=True)
class TrainingProgress:
    """A snapshot of a background training run.

    Attributes:
        epoch: the epoch now running (0-based, as Keras counts; after a
            resume from a checkpoint it starts above 0).
        epochs: the epoch count given to `fit`.
        step: batches finished in the current epoch.
        steps_per_epoch: batches per epoch, when known.
        total_steps: batches finished in this run.
        logs: the latest batch logs (e.g. running `loss`, `accuracy`).
        epoch_logs: the logs of the last finished epoch (with `val_` metrics).
        published: weight versions published (all `PublishWeights` callbacks).
        version: the latest version published to the first predictor, or None.
        elapsed_s: seconds since training began.
        done: training is over (finished, stopped or failed).
    """

    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps_per_epoch: int | None = None
    total_steps: int = 0
    logs: dict[str, float] = dataclasses.field(default_factory=dict)
    epoch_logs: dict[str, float] = dataclasses.field(default_factory=dict)
    published: int = 0
    version: int | None = None
    elapsed_s: float = 0.0
    done: bool = False


def _floats(logs: dict | None) -> dict[str, float]:
    out = {}
    for k, v in (logs or {}).items():
        with contextlib.suppress(TypeError, ValueError):
            out[k] = float(v)
    return out


class _RunControl(keras.callbacks.Callback):
    """Feeds a `TrainingRun` its progress, applies `stop()`, and releases `join()`."""

    def __init__(self, run: TrainingRun):
        super().__init__()
        self._run = weakref.proxy(run)

    def on_train_begin(self, logs=None):
        self._run._on_begin(self.model, self.params)
        if self._run._stop.is_set():
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._run._update(epoch=epoch, step=0)

    def on_train_batch_end(self, batch, logs=None):
        self._run._on_batch(batch + 1, _floats(logs))
        if self._run._stop.is_set():
            self.model.stop_training = True

    def on_test_batch_end(self, batch, logs=None):
        if self._run._stop.is_set():
            self.model.stop_evaluating = True  # validation inside fit stops too

    def on_epoch_end(self, epoch, logs=None):
        self._run._update(epoch_logs=_floats(logs))

    def on_train_end(self, logs=None):
        # Released here, not after fit returns: fit then frees its last tf.data
        # iterator, which can stall for seconds (see the module docstring).
        self._run._finish()


class TrainingRun:
    """A `model.fit` running on its own thread; made by `train_in_background`.

    Attributes:
        thread: the training thread.
        publishers: the `PublishWeights` callbacks of this run (for their
            counters and publish timings).
    """

    def __init__(self, model: Any, fit_args: dict[str, Any], callbacks: list,
                 publishers: list[PublishWeights], fit: Any = None):
        self._model = model
        self._fit = fit or model.fit
        self.publishers = publishers
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._history: Any = None
        self._started_at: float | None = None
        self._state: dict[str, Any] = {"epochs": fit_args["epochs"]}
        self._fit_args = dict(fit_args, callbacks=[*callbacks, _RunControl(self)])
        self.thread = threading.Thread(target=self._main, name="keras-tandem-training",
                                       daemon=True)
        _LIVE.add(self)
        self.thread.start()

    # ------------------------------------------------------------- public

    @property
    def progress(self) -> TrainingProgress:
        """A consistent snapshot of where training is (see `TrainingProgress`)."""
        with self._lock:
            state = dict(self._state)
        published = sum(p.published for p in self.publishers)
        version = next((p.last_version for p in self.publishers
                        if p.last_version is not None), None)
        elapsed = _now() - self._started_at if self._started_at is not None else 0.0
        return TrainingProgress(**state, published=published, version=version,
                                elapsed_s=elapsed, done=self.done)

    @property
    def history(self) -> Any:
        """The `keras.callbacks.History` of this run (filling up while it trains), or None."""
        return self._history

    @property
    def done(self) -> bool:
        """Whether training is over: finished, stopped or failed."""
        return self._finished.is_set()

    @property
    def error(self) -> BaseException | None:
        """The exception that ended training, or None."""
        return self._error

    def stop(self) -> None:
        """Asks training to stop after the batch now running; returns at once.

        The epoch-end and train-end callbacks still run (so weights are
        published and checkpoints written). Call `join()` to wait.
        """
        self._stop.set()

    def join(self, timeout: float | None = None) -> Any:
        """Waits for training to end.

        Args:
            timeout: the most seconds to wait; None waits as long as it takes.

        Returns:
            The `keras.callbacks.History` that `fit` returns.

        Raises:
            TimeoutError: training still runs after `timeout` seconds.
            Exception: whatever ended training with an error, re-raised.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"Training still runs after {timeout} s "
                               f"(epoch {self._state.get('epoch')}).")
        if self._error is not None:
            raise self._error
        return self._history

    def __repr__(self) -> str:
        p = self.progress
        state = "failed" if self._error else "done" if p.done else "training"
        return f"<TrainingRun {state} epoch={p.epoch}/{p.epochs} step={p.step}>"

    # ---------------------------------------------- the training thread

    def _main(self) -> None:
        try:
            history = self._fit(**self._fit_args)
            if self._history is None:
                self._history = history
        except BaseException as e:  # noqa: BLE001 - re-raised by join() in the caller
            self._error = e
        finally:
            self._finished.set()
            self._fit_args = {}  # drop the data and callbacks with the thread

    def _on_begin(self, model: Any, params: dict) -> None:
        self._history = getattr(model, "history", None)
        self._started_at = _now()
        self._update(epochs=params.get("epochs", self._state["epochs"]),
                     steps_per_epoch=params.get("steps"))

    def _on_batch(self, step: int, logs: dict[str, float]) -> None:
        with self._lock:
            s = self._state
            s["total_steps"] = s.get("total_steps", 0) + max(1, step - s.get("step", 0))
            s["step"] = step
            s["logs"] = logs

    def _update(self, **fields: Any) -> None:
        with self._lock:
            self._state.update(fields)

    def _finish(self) -> None:
        self._finished.set()


# --------------------------------------------------------------- inputs

def _prepare_inputs(data: Any, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """fit's data arguments for `data`: our own pipelines for arrays and generators."""
    if keras.backend.backend() != "tensorflow":
        return _prepare_inputs_plain(data, fit_kwargs)
    import tensorflow as tf

    from keras_tandem.training import _inputs

    kwargs = dict(fit_kwargs)
    if isinstance(data, (tf.data.Dataset, keras.utils.PyDataset)):
        kwargs.setdefault("shuffle", False)  # keras warns that it ignores shuffle=True
        return {"x": data, **kwargs}
    if _inputs.is_arrays(data):
        batch_size = int(kwargs.pop("batch_size", None) or 32)
        shuffle = kwargs.pop("shuffle", True)
        arrays = _inputs.take_arrays(data, kwargs)
        split = kwargs.pop("validation_split", 0.0) or 0.0
        if split and kwargs.get("validation_data") is None:
            arrays, kwargs["validation_data"] = _inputs.split_validation(arrays, split)
        val = kwargs.get("validation_data")
        if _inputs.is_arrays(val):
            val_batch = int(kwargs.pop("validation_batch_size", None) or batch_size)
            kwargs["validation_data"] = _inputs.array_dataset(
                tuple(d for d in val if d is not None), val_batch, shuffle=False)
        return {"x": _inputs.array_dataset(arrays, batch_size, shuffle=bool(shuffle)),
                "shuffle": False, **kwargs}
    if inspect.isgenerator(data) or isinstance(data, Iterator):
        return {"x": _inputs.generator_dataset(data), "shuffle": False, **kwargs}
    raise TypeError(
        "data must be a tf.data.Dataset, a keras.utils.PyDataset, a generator of (x, y) "
        f"batches, or a tuple (x, y) or (x, y, sample_weight) of arrays; got {type(data)}.")


def _is_tf_dataset(data: Any) -> bool:
    return any(c.__module__.startswith("tensorflow") and c.__name__.endswith("Dataset")
               for c in type(data).__mro__)


def _prepare_inputs_plain(data: Any, fit_kwargs: dict[str, Any]) -> dict[str, Any]:
    """fit's data arguments on a backend other than TensorFlow: Keras' own adapters."""
    kwargs = dict(fit_kwargs)
    if isinstance(data, keras.utils.PyDataset) or _is_tf_dataset(data):
        kwargs.setdefault("shuffle", False)  # keras warns that it ignores shuffle=True
        return {"x": data, **kwargs}
    if isinstance(data, tuple) and len(data) in (2, 3) and not any(
            isinstance(d, Iterator) for d in data):
        x, y, *rest = data
        kwargs.setdefault("batch_size", 32)
        if rest and rest[0] is not None:
            kwargs.setdefault("sample_weight", rest[0])
        return {"x": x, "y": y, **kwargs}
    if inspect.isgenerator(data) or isinstance(data, Iterator):
        kwargs.pop("shuffle", None)  # a generator is read in its own order
        return {"x": data, "shuffle": False, **kwargs}
    raise TypeError(
        "data must be a keras.utils.PyDataset, a generator of (x, y) batches, or a tuple "
        "(x, y) or (x, y, sample_weight) of arrays (or a tf.data.Dataset, with TensorFlow "
        f"installed); got {type(data)}.")


def _publishers(publish_to: Any, callbacks: Sequence) -> tuple[list, list[PublishWeights]]:
    own: list = []
    if isinstance(publish_to, PublishWeights):
        if not any(c is publish_to for c in callbacks):
            own.append(publish_to)
    elif publish_to is not None:
        own.append(PublishWeights(publish_to, on_epoch_end=True))
    publishers = [*own, *(c for c in callbacks if isinstance(c, PublishWeights))]
    return own, publishers


def _cluster_size() -> int:
    try:
        return cluster_position().workers
    except ValueError:  # choose_strategy() reports a malformed TF_CONFIG
        return 1


def train_in_background(
    model: Any,
    data: Any,
    *,
    epochs: int,
    publish_to: Any = None,
    callbacks: Sequence[Any] = (),
    checkpoint_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> TrainingRun:
    """Starts `model.fit` on a background thread and returns a handle to it.

    Args:
        model: a compiled Keras model.
        data: a `tf.data.Dataset` (or `keras.utils.PyDataset`) of batches; a
            Python generator of `(x, y)` batches; or a tuple `(x, y)` /
            `(x, y, sample_weight)` of arrays, batched with `batch_size`
            (default 32) and reshuffled each epoch unless `shuffle=False`.
        epochs: the number of epochs, as for `fit`.
        publish_to: a `Predictor`, a list of them, or a `PublishWeights`
            callback: weights are then published at least at every epoch end
            and when training ends or is stopped. For more frequent
            publishes pass a `PublishWeights` with `every_n_batches` or
            `every_seconds`.
        callbacks: more Keras callbacks for `fit`.
        checkpoint_dir: if given, a folder for `BackupAndRestore` state
            (`backup/`, written at each epoch end, removed when training
            completes) plus `last.keras` (each epoch) and, with validation
            data, `best.keras` (lowest `val_loss`). A process killed and
            started again with the same call resumes after the last epoch
            saved instead of at epoch 0.
        **fit_kwargs: anything else `fit` takes (`batch_size`,
            `validation_data`, `validation_split`, `steps_per_epoch`,
            `class_weight`, `verbose` (default 0), ...).

    Under a `MultiWorkerMirroredStrategy` (the model built in its scope, see
    `choose_strategy`), every worker calls this with the same arguments and
    a loop of keras-tandem's own replaces `fit` (Keras 3's `fit` fails
    there): `batch_size` is per worker (global batch = `batch_size` x
    workers), a dataset yields global batches, only `batch_size`,
    `shuffle`, `seed` (the same shuffle on every worker), `sample_weight`,
    `steps_per_epoch`, `initial_epoch`, `verbose` and the validation
    arguments are taken, and `checkpoint_dir` holds a `tf.train.Checkpoint`
    backup written by the chief plus its `last.keras` (and `best.keras`).
    A dead or frozen worker makes the others raise `keras_tandem.WorkerLost`
    from `join()`; starting the cluster again resumes after the last epoch
    saved. `cluster_position()` says which worker is the chief.

    Returns:
        A `TrainingRun`: `progress`, `history`, `stop()`, `join()`, `done`.

    Raises:
        ValueError: the model is not compiled.
        RuntimeError: the model is already training in the background.
        TypeError: `data` is of no supported kind.

    A failure in training is raised by `join()`; it never touches the
    predictors, which keep serving the last version published.
    """
    if not getattr(model, "compiled", True):
        raise ValueError("train_in_background: compile the model before training it.")
    if any(run._model is model and not run.done for run in list(_LIVE)):
        raise RuntimeError("train_in_background: this model is already training in the "
                           "background; stop() and join() that run first.")
    callbacks = list(callbacks)
    own, publishers = _publishers(publish_to, callbacks)
    strategy = None
    if keras.backend.backend() == "tensorflow":
        from keras_tandem.training import _multiworker

        strategy = _multiworker.multi_worker_strategy(model)
    if strategy is not None:
        # Keras 3's fit fails under this strategy (keras-team/keras#20585): our own loop.
        fit_args = {"data": data, "epochs": epochs, "checkpoint_dir": checkpoint_dir,
                    "strategy": strategy, "verbose": 0, **fit_kwargs}
        fit = functools.partial(_multiworker.fit, model)
        return TrainingRun(model, fit_args, [*callbacks, *own], publishers, fit=fit)
    if _cluster_size() > 1:
        warnings.warn("train_in_background: TF_CONFIG names a multi-worker cluster, but the "
                      "model was not built under a MultiWorkerMirroredStrategy's scope: this "
                      "worker trains alone. Call choose_strategy() first and build the model "
                      "in its scope().", RuntimeWarning, stacklevel=2)
    validating = bool(fit_kwargs.get("validation_data") is not None
                      or fit_kwargs.get("validation_split"))
    checkpoints: list = []
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # First in the list: it restores weights and the epoch before the others start.
        checkpoints.append(keras.callbacks.BackupAndRestore(backup_dir=str(folder / "backup")))
        checkpoints.append(keras.callbacks.ModelCheckpoint(str(folder / "last.keras")))
        if validating:
            checkpoints.append(keras.callbacks.ModelCheckpoint(
                str(folder / "best.keras"), monitor="val_loss", save_best_only=True))
    fit_args = _prepare_inputs(data, fit_kwargs)
    fit_args.setdefault("verbose", 0)
    fit_args["epochs"] = epochs
    return TrainingRun(model, fit_args, [*checkpoints, *callbacks, *own], publishers)
