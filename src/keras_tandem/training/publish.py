"""`PublishWeights`: a Keras callback that hands a running fit's weights to predictors.

Separation of concerns:
- This module owns *when* and *whether* to publish: the schedule (every n
  batches, every n seconds, at epoch end, at train end), the refusal of
  non-finite weights, the hand-off thread, and the measurement of how long
  each publish stalls the training thread.
- `Predictor.update_weights` owns the swap itself: copying the arrays and
  serving them from the next batch on, each answer from one version.

The snapshot is read on the training thread between two batches, so it is
consistent (no optimizer step half applied). By default the rest (the
NaN/Inf check and `update_weights`, which waits for the predictor's worker to
finish its batch) runs on a hand-off thread, so training stalls only for the
read; at the end of training the callback waits until the predictors serve
the final weights.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from keras_tandem.errors import PredictorClosed

_now = time.perf_counter
_IDLE_EXIT_S = 5.0  # a hand-off thread with nothing to do ends after this


def all_finite(arrays: Sequence[np.ndarray]) -> bool:
    """Whether every floating-point array holds only finite values (no NaN, no Inf).

    Args:
        arrays: arrays like `model.get_weights()`; integer and boolean ones
            are always finite and skipped.

    Returns:
        True when no array contains NaN or +/-Inf.
    """
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "biuSUO":
            continue
        if not np.isfinite(a).all():
            return False
    return True


class _WeightReader:
    """Reads a model's weights, like `get_weights()`, as the training loop has them now.

    Called on the training thread between two batches, so the snapshot is
    consistent; each backend needs its own way:
    - TensorFlow: one traced call that reads every variable. `get_weights()`
      makes one eager read per variable; on the training thread, with other
      threads contending for the GIL, each costs a round trip, and a model with
      hundreds of variables stalls training for all of them. The values are the
      same snapshot: TensorFlow copies a variable's buffer before updating it
      while a read still holds it. Falls back to `get_weights()` for anything
      the traced call cannot read (e.g. distributed variables).
    - JAX: Keras' JAX trainer keeps the live state outside the variables while
      `fit` runs (it purges their values and writes them back only at a state
      sync, e.g. at epoch end). The reader copies the trainer's live
      trainable and non-trainable state (`model._jax_state`, set before
      every `on_train_batch_end` so that callbacks can read it) to NumPy now:
      the next step donates those buffers. Outside a running step (the state
      synced), `get_weights()` is right.
    - PyTorch: the optimizer updates parameters in place, so the reader takes
      copies (`torch.no_grad()`, never views) before the next step can change
      them: the hand-off thread never sees a half-applied step.
    """

    def __init__(self, model: Any):
        self._model = model
        self._fn = None
        self._backend = keras.backend.backend()
        if self._backend != "tensorflow":
            return
        try:
            import tensorflow as tf

            variables = [w.value for w in model.weights]
            if variables and all(isinstance(v, tf.Variable) for v in variables):
                fn = tf.function(lambda: [tf.identity(v) for v in variables])
                fn()  # trace now (at train begin), not at the first publish
                self._fn = fn
        except Exception:  # noqa: BLE001 - the plain way always works
            self._fn = None

    def read(self) -> list[np.ndarray]:
        if self._fn is not None:
            try:
                return [t.numpy() for t in self._fn()]
            except Exception:  # noqa: BLE001 - fall back for good
                self._fn = None
        if self._backend == "jax":
            live = self._jax_live_state()
            if live is not None:
                return live
        if self._backend == "torch":
            return self._torch_copies()
        return self._model.get_weights()

    def _jax_live_state(self) -> list[np.ndarray] | None:
        """The JAX trainer's live weights in `model.weights` order, or None when synced."""
        model = self._model
        state = getattr(model, "_jax_state", None)
        if not state or getattr(model, "_jax_state_synced", True):
            return None
        trainable = state.get("trainable_variables")
        non_trainable = state.get("non_trainable_variables")
        if trainable is None or len(trainable) != len(model.trainable_variables) or (
                non_trainable is None and model.non_trainable_variables) or (
                non_trainable is not None
                and len(non_trainable) != len(model.non_trainable_variables)):
            # Not the trainer this reader knows: let Keras write the state back.
            model.jax_state_sync()
            return None
        position = {id(v): (trainable, i) for i, v in enumerate(model.trainable_variables)}
        position.update({id(v): (non_trainable, i)
                         for i, v in enumerate(model.non_trainable_variables)})
        out = []
        for w in model.weights:
            values, i = position[id(w)]
            out.append(np.array(values[i]))  # a host copy: the next step donates the buffer
        return out

    def _torch_copies(self) -> list[np.ndarray]:
        import torch

        out = []
        with torch.no_grad():
            for w in self._model.weights:
                t = w.value.detach()
                if t.dtype == torch.bfloat16:
                    out.append(np.asarray(w.numpy()).copy())
                    continue
                # .cpu() copies a GPU tensor; a CPU one is cloned (numpy() alone is a view).
                out.append(t.cpu().numpy() if t.device.type != "cpu" else t.clone().numpy())
        return out


class PublishWeights(keras.callbacks.Callback):
    """Publishes the training model's weights to one or more `Predictor`s during `fit`.

    Each publish reads the model's weights once (what `get_weights()` returns,
    in one traced call), on the training thread between two batches, and
    hands the same snapshot to every predictor with `update_weights`.
    Weights containing NaN or Inf are refused: skipped, counted in `refused`
    and warned about once, never raised, so `fit` goes on and the predictors
    keep serving the last good version. A publish also
    happens at the end of training if any batch ran since the last one, and
    when `fit` ends (normally or by `stop_training`) the callback waits until
    every predictor serves the final snapshot.

    Args:
        predictor: a `Predictor`, or a list of them (anything with
            `update_weights(arrays) -> int`).
        every_n_batches: publish after every n training batches (counted
            since the last publish); None to not publish by batch count.
        every_seconds: publish at the first batch end at least this many
            seconds after the last publish; None to not publish by time.
        on_epoch_end: publish at the end of every epoch.
        wait: hand each snapshot over on the training thread and wait for the
            swap (exact, but the stall includes waiting for the predictor's
            worker). By default a hand-off thread does it; if a snapshot is
            still waiting there when the next one comes, only the newer one
            is published (counted in `superseded`).

    Attributes:
        published: snapshots that reached at least one predictor.
        refused: snapshots skipped because the weights were not finite.
        superseded: snapshots replaced by a newer one before their turn.
        failed: updates a predictor did not take (closed, or timed out).
        last_versions: the last version each predictor returned (None
            before the first publish), in the order given.
        publish_seconds_total, publish_seconds_max: time the training thread
            was stalled by publishes.
        swap_seconds_max: longest time from reading a snapshot to every
            predictor serving it.

    Raises:
        ValueError: (from `fit`, at the next publish or at the end) the
            weights do not fit a predictor's model: a wiring error that
            publishing later would not fix.

    Example:

    ```python
    predictor = Predictor(model)
    model.fit(x, y, epochs=5, callbacks=[PublishWeights(predictor, every_n_batches=50)])
    ```
    """

    def __init__(
        self,
        predictor: Any,
        every_n_batches: int | None = None,
        every_seconds: float | None = None,
        on_epoch_end: bool = True,
        *,
        wait: bool = False,
    ):
        super().__init__()
        targets = list(predictor) if isinstance(predictor, (list, tuple)) else [predictor]
        if not targets:
            raise ValueError("PublishWeights needs at least one predictor.")
        for t in targets:
            if not callable(getattr(t, "update_weights", None)):
                raise TypeError(f"{t!r} has no update_weights(): pass a Predictor "
                                "or a list of Predictors.")
        if every_n_batches is not None and every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}.")
        if every_seconds is not None and every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0, got {every_seconds}.")
        self.predictors = targets
        self.every_n_batches = every_n_batches
        self.every_seconds = every_seconds
        self.publish_on_epoch_end = bool(on_epoch_end)
        self.wait = bool(wait)
        self.published = 0
        self.refused = 0
        self.superseded = 0
        self.failed = 0
        self.last_versions: list[int | None] = [None] * len(targets)
        self.publish_seconds_total = 0.0
        self.publish_seconds_max = 0.0
        self.swap_seconds_max = 0.0
        self._reads = 0
        self._since_publish = 0  # batches trained since the last snapshot
        self._last_publish = _now()
        self._warned: set[str] = set()
        # Hand-off state, guarded by _cond: the newest snapshot not yet taken,
        # whether the hand-off thread is busy with one, and a wiring error.
        self._cond = threading.Condition()
        self._pending: tuple[list[np.ndarray], float] | None = None
        self._busy = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._reader: _WeightReader | None = None

    # ------------------------------------------------------------- figures

    @property
    def last_version(self) -> int | None:
        """The version the first predictor returned at the last publish (None before)."""
        return self.last_versions[0]

    @property
    def publish_seconds_mean(self) -> float:
        """Mean training-thread stall per snapshot, in seconds (0 before any)."""
        return self.publish_seconds_total / self._reads if self._reads else 0.0

    def summary(self) -> dict[str, Any]:
        """The counters and publish timings as a dict (for logs and reports)."""
        return {
            "published": self.published,
            "refused": self.refused,
            "superseded": self.superseded,
            "failed": self.failed,
            "last_versions": list(self.last_versions),
            "publish_seconds_total": self.publish_seconds_total,
            "publish_ms_mean": self.publish_seconds_mean * 1e3,
            "publish_ms_max": self.publish_seconds_max * 1e3,
            "swap_ms_max": self.swap_seconds_max * 1e3,
        }

    # ------------------------------------------------------------ callbacks

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._reader = _WeightReader(self.model)  # the state is synced at train begin
        self._since_publish = 0
        self._last_publish = _now()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._since_publish += 1
        if (self.every_n_batches is not None and self._since_publish >= self.every_n_batches) \
                or (self.every_seconds is not None
                    and _now() - self._last_publish >= self.every_seconds):
            self.publish()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.publish_on_epoch_end and self._since_publish:
            self.publish()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._since_publish:
            self.publish()
        self.flush(stop=True)

    # ------------------------------------------------------------ publishing

    def publish(self) -> None:
        """Reads the model's weights now and publishes them (called by the schedule).

        Raises:
            ValueError: an earlier snapshot did not fit a predictor's model.
        """
        self._raise_error()
        start = _now()
        try:
            # Not `self.model`: on JAX that property writes the trainer's whole
            # state (optimizer and metrics too) back into the variables first;
            # the reader takes only the weights, straight from the live state.
            model = getattr(self, "_model", None) or self.model
            if self._reader is None or self._reader._model is not model:
                self._reader = _WeightReader(model)
            arrays = self._reader.read()
            if self.wait:
                self._hand_over(arrays, start)
            else:
                self._enqueue(arrays, start)
        finally:
            elapsed = _now() - start
            self._reads += 1
            self.publish_seconds_total += elapsed
            self.publish_seconds_max = max(self.publish_seconds_max, elapsed)
            self._since_publish = 0
            self._last_publish = _now()
        self._raise_error()

    def flush(self, timeout: float | None = None, *, stop: bool = False) -> None:
        """Waits until every snapshot taken so far is published (or refused).

        Args:
            timeout: the most seconds to wait (None: as long as it takes;
                each `update_weights` has its own deadline).
            stop: also end the hand-off thread (a later publish starts a new one).

        Raises:
            ValueError: a snapshot did not fit a predictor's model.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)
            if stop and self._thread is not None:
                self._closing = True
                self._cond.notify_all()
            thread = self._thread if stop else None
        if thread is not None:
            thread.join(timeout)
            with self._cond:
                if self._thread is thread:
                    self._thread = None
                self._closing = False
        self._raise_error()

    def _enqueue(self, arrays: list[np.ndarray], read_at: float) -> None:
        with self._cond:
            if self._pending is not None:
                self.superseded += 1  # only the newest snapshot is worth serving
            self._pending = (arrays, read_at)
            if self._thread is None:
                self._thread = threading.Thread(target=self._hand_off_loop, daemon=True,
                                                name="keras-tandem-publish")
                self._thread.start()
            self._cond.notify_all()

    def _hand_off_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closing,
                                    _IDLE_EXIT_S)
                if self._pending is None:
                    # Closing, or idle (e.g. fit failed before on_train_end): end the
                    # thread; the next snapshot starts a new one.
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
                (arrays, read_at), self._pending = self._pending, None
                self._busy = True
            try:
                self._hand_over(arrays, read_at)
            except BaseException as e:  # noqa: BLE001 - raised on the training thread
                self._error = e
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _hand_over(self, arrays: list[np.ndarray], read_at: float) -> None:
        if not all_finite(arrays):
            self.refused += 1
            self._warn_once("nan", "PublishWeights: the model's weights contain NaN or "
                            "Inf; not published (predictors keep serving the last good "
                            "version). Further refusals are counted in `refused`.")
            return
        took = False
        for i, p in enumerate(self.predictors):
            try:
                self.last_versions[i] = p.update_weights(arrays)
                took = True
            except (PredictorClosed, TimeoutError) as e:
                self.failed += 1
                self._warn_once(type(e).__name__, f"PublishWeights: a predictor did not "
                                f"take the weights ({type(e).__name__}: {e}); training "
                                "goes on. Further failures are counted in `failed`.")
        if took:
            self.published += 1
            self.swap_seconds_max = max(self.swap_seconds_max, _now() - read_at)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
