"""Training under `MultiWorkerMirroredStrategy`: our own train step in place of `model.fit`.

Why: Keras 3's `model.fit` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585: a PerReplica value converted to a Tensor, then a
metric reduction over scalars). This module replaces `fit` with a loop on
public APIs only: `strategy.run` over a step that calls the model,
`model.compute_loss` (which already scales the loss by 1/replicas),
`optimizer.apply_gradients` (which sums the gradients across replicas) and
`model.compute_metrics`; the step's logs are reduced across workers with
`strategy.reduce`, so every worker sees the same logs. Keras callbacks are
driven by hand through `keras.callbacks.CallbackList` (progress, History,
`PublishWeights`, `EarlyStopping`, the run's own control).

Owns:
- `multi_worker_strategy`: whether a model trains under such a strategy.
- `fit`: the loop (what `TrainingRun` calls instead of `model.fit`), the
  input distribution (global batch = per-worker batch x workers, sharding),
  the cluster-wide stop flag, and the checkpoints.

Fault tolerance: with a checkpoint folder, every worker saves a
`tf.train.Checkpoint` (model, optimizer, epoch) at each epoch end, the chief
into `<dir>/backup`, the others into a scratch folder they delete (the TF
recipe: saving may take part in collectives, so all must call it). At start
every worker restores what it finds and then takes the chief's values
(variables and epoch) by an all-reduce, so all start identical even without
a shared file system. A dead peer makes the survivors' next collective fail
at once; a frozen one is caught by TensorFlow's coordination service
heartbeats or by our own deadline on each step (`_CollectiveDeadline`, the
`collective_timeout_s` of `choose_strategy`), whichever comes first; the
error is re-raised as `WorkerLost` with the epoch to resume from. The backup
is removed when training completes, as Keras's `BackupAndRestore` does.

Not here: where this process stands in the cluster (`cluster_position`, in
`keras_tandem.cluster.tf_config`) and turning arrays and generators into
datasets (`_inputs.py`, shared with `background.py`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# The one private TensorFlow entry point here: aborting collectives (see
# _CollectiveDeadline); TensorFlow's own multi-worker health check calls it.
from tensorflow.python.eager import context

from keras_tandem.cluster.strategy import collective_timeout
from keras_tandem.cluster.tf_config import cluster_position
from keras_tandem.errors import WorkerLost
from keras_tandem.training import _inputs

log = logging.getLogger("keras_tandem.multiworker")
_COLLECTIVE_ERRORS = (tf.errors.DeadlineExceededError, tf.errors.UnavailableError,
                      tf.errors.CancelledError, tf.errors.AbortedError,
                      tf.errors.InternalError, tf.errors.FailedPreconditionError)


def multi_worker_strategy(model: Any) -> Any:
    """The model's `MultiWorkerMirroredStrategy`, or None when it trains otherwise.

    Args:
        model: a Keras model (built under the strategy's scope to use it).

    Returns:
        The strategy when it is a `MultiWorkerMirroredStrategy`, else None.
    """
    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return strategy
    return None


# ------------------------------------------------------------------ inputs

def _global_batches(data: Any, kwargs: dict[str, Any], workers: int,
                    steps_per_epoch: int | None) -> tuple[Any, int, bool]:
    """Returns `(dataset of global batches, steps per epoch, one iterator for all epochs)`."""
    if _inputs.is_arrays(data):
        batch = int(kwargs.pop("batch_size", None) or 32)
        arrays = tf.nest.map_structure(np.asarray, _inputs.take_arrays(data, kwargs))
        global_batch = batch * workers
        rows = _inputs.rows(arrays)
        steps = steps_per_epoch or rows // global_batch
        if steps < 1:
            raise ValueError(f"{rows} rows make no global batch of {batch} x {workers} workers.")
        # The same seed on every worker: DATA sharding needs one order for all.
        dataset = _inputs.array_dataset(arrays, global_batch,
                                        shuffle=bool(kwargs.pop("shuffle", True)),
                                        seed=int(kwargs.pop("seed", 0)), repeat=True)
        return dataset, steps, True
    kwargs.pop("shuffle", None)
    if isinstance(data, tf.data.Dataset):
        dataset = data
        if (dataset.options().experimental_distribute.auto_shard_policy
                == tf.data.experimental.AutoShardPolicy.AUTO):
            # AUTO would try file sharding first and warn; say what we mean.
            options = tf.data.Options()
            options.experimental_distribute.auto_shard_policy = \
                tf.data.experimental.AutoShardPolicy.DATA
            dataset = dataset.with_options(options)
    elif isinstance(data, Iterator):
        dataset = _inputs.generator_dataset(data)
    else:
        raise TypeError("Under MultiWorkerMirroredStrategy, data must be a tuple of arrays, a "
                        f"tf.data.Dataset or a generator of batches; got {type(data)}.")
    cardinality = int(dataset.cardinality())
    if steps_per_epoch:
        return dataset.repeat() if cardinality >= 0 else dataset, steps_per_epoch, True
    if cardinality > 0:
        return dataset, cardinality, False
    raise ValueError("Under MultiWorkerMirroredStrategy every worker must run the same number of "
                     "steps: pass steps_per_epoch= for a dataset or generator of unknown length.")


# ------------------------------------------------------- the collective deadline

class _CollectiveDeadline:
    """Aborts this process's collectives when one guarded call waits too long.

    Why not `CommunicationOptions(timeout_seconds=...)`: when TensorFlow's own
    timeout fires (`BaseCollectiveExecutor::ExecuteAsync`), it completes the
    op at once while its ring all-reduce still has receives in flight to the
    silent peer; their cancellation callbacks (`RingAlg::StartAbort`) then
    use the op's `CancellationManager`, already freed: the survivor died by
    SIGSEGV or SIGABRT instead of raising, often under load. Aborting the
    collective executor instead, as TensorFlow's peer health check and its
    coordination service do, fails the op only once the ring has finished
    its receives.

    A context manager that owns one thread, joined on exit. After it fired,
    every collective of this process fails at once (TensorFlow's rule), so it
    fires once.
    """

    def __init__(self, timeout_s: float):
        self._timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._due: float | None = None  # when the guarded call times out; None: idle
        self._what = ""
        self._closed = False
        self._thread = threading.Thread(target=self._watch, daemon=True,
                                        name="keras-tandem-collective-deadline")
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._cond:
            self._due, self._what = time.monotonic() + self._timeout_s, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._due = None

    def __enter__(self) -> _CollectiveDeadline:
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._closed:
                    return
                left = None if self._due is None else self._due - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            what = self._what
        log.error("%s waited more than %g s for the other workers: aborting this worker's "
                  "collectives", what, self._timeout_s)
        context.context().abort_collective_ops(
            tf.errors.DEADLINE_EXCEEDED,
            f"{what} waited more than {self._timeout_s:g} s for the other workers (the "
            "collective timeout, see choose_strategy).")


# -------------------------------------------------------------- the loop

def _sync_from_chief(strategy: Any, variables: list, is_chief: bool) -> None:
    """Sets every worker's `variables` to the chief's (an all-reduce of chief-only values)."""
    chief = tf.constant(is_chief)

    @tf.function
    def broadcast():
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            first = ctx.replica_id_in_sync_group == 0
            keep = tf.logical_and(chief, first)
            out = {}
            for dtype, indices in groups.items():  # one all-reduce per dtype (they pack)
                values = [tf.where(keep, tf.identity(variables[i]),
                                   tf.zeros_like(variables[i])) for i in indices]
                out[dtype] = ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)
            return out

        return strategy.run(replica_fn)

    groups: dict[str, list[int]] = {}
    for i, v in enumerate(variables):
        groups.setdefault(tf.as_dtype(v.dtype).name, []).append(i)
    reduced = broadcast()
    for dtype, indices in groups.items():
        for i, value in zip(indices, reduced[dtype]):
            variables[i].assign(strategy.experimental_local_results(value)[0])


def _scratch_dir(folder: Path, index: int) -> Path:
    return folder / f".worker_{index}_scratch"


def fit(model: Any, data: Any, *, strategy: Any, epochs: int, callbacks: list,
        checkpoint_dir: str | Path | None = None, verbose: int = 0,
        steps_per_epoch: int | None = None, initial_epoch: int = 0,
        **kwargs: Any) -> Any:
    """Trains `model` under a `MultiWorkerMirroredStrategy`, like `model.fit` would.

    Every worker of the cluster must call it with the same arguments.

    Args:
        model: a compiled Keras model built under `strategy.scope()`.
        data: a tuple `(x, y[, sample_weight])` of arrays (batched by
            `batch_size` per worker, global batch = `batch_size` x workers,
            reshuffled each epoch with the same `seed` on all workers), a
            `tf.data.Dataset` of global batches, or a generator of global
            batches (with `steps_per_epoch`). Datasets keep their own
            auto-shard policy unless it is AUTO, which becomes DATA.
        strategy: the `MultiWorkerMirroredStrategy`.
        epochs: epochs to train.
        callbacks: Keras callbacks, driven by hand.
        checkpoint_dir: folder for the resumable backup (see the module doc)
            and, on the chief, `last.keras` at each epoch end.
        verbose: a progress bar on the chief when nonzero.
        steps_per_epoch: global steps per epoch; by default one pass.
        initial_epoch: the epoch to start at when there is no backup.
        **kwargs: `batch_size`, `shuffle`, `seed`, `sample_weight`, and
            `validation_data` / `validation_split` (`validation_steps`,
            `validation_batch_size`: per worker): evaluated at each epoch
            end, whole global batches only, `val_` logs; then the chief
            also keeps `best.keras` (lowest `val_loss` of this run). Others
            (class weights, ...) are refused.

    Returns:
        The `keras.callbacks.History`.

    Raises:
        WorkerLost: a peer died or timed out; restart the whole cluster.
        ValueError: an unsupported argument, or no full global batch.
    """
    index, workers, is_chief = cluster_position(strategy)
    kwargs = dict(kwargs)
    validation = kwargs.pop("validation_data", None)
    split = kwargs.pop("validation_split", 0.0) or 0.0
    validation_steps = kwargs.pop("validation_steps", None)
    validation_batch = kwargs.pop("validation_batch_size", None) or kwargs.get("batch_size")
    unsupported = sorted(k for k, v in kwargs.items()
                         if k not in ("batch_size", "shuffle", "seed", "sample_weight")
                         and v not in (None, 0, 0.0))
    if unsupported:
        raise ValueError(f"Under MultiWorkerMirroredStrategy, train_in_background does not take "
                         f"{', '.join(unsupported)}.")
    if split and validation is None:
        if not _inputs.is_arrays(data):
            raise ValueError("validation_split needs arrays; pass validation_data instead.")
        data, validation = _inputs.split_validation(_inputs.take_arrays(data, kwargs), split)
    with strategy.scope(), _CollectiveDeadline(collective_timeout(strategy)) as deadline:
        dataset, steps, persistent = _global_batches(data, dict(kwargs), workers, steps_per_epoch)
        dist = strategy.experimental_distribute_dataset(dataset)
        val_dist, val_steps = None, 0
        if validation is not None:
            val_kwargs = {"batch_size": validation_batch, "shuffle": False}
            val_ds, val_steps, _ = _global_batches(validation, val_kwargs, workers,
                                                   validation_steps)
            if isinstance(validation, tuple):  # arrays repeat for ever: one pass per epoch
                val_ds = val_ds.take(val_steps)
            val_dist = strategy.experimental_distribute_dataset(val_ds)
        model.optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(initial_epoch, dtype=tf.int64, trainable=False)

        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        manager = None
        if folder is not None:
            if not is_chief:
                _scratch_dir(folder, index).mkdir(parents=True, exist_ok=True)
            target = folder / "backup" if is_chief else _scratch_dir(folder, index)
            checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                             epoch=epoch_var)
            manager = tf.train.CheckpointManager(checkpoint, str(target), max_to_keep=1)
            restore_from = tf.train.latest_checkpoint(str(folder / "backup"))
            if restore_from:
                checkpoint.restore(restore_from).expect_partial()
        try:
            # The chief's values win: identical weights and epoch on every worker.
            synced = [*model.variables, *model.optimizer.variables, epoch_var]
            with deadline.guard("the start (the chief's weights and epoch)"):
                _sync_from_chief(strategy, synced, is_chief)
        except _COLLECTIVE_ERRORS as e:
            raise WorkerLost(f"worker {index} of {workers}: the cluster lost a worker or timed "
                             f"out at the start ({type(e).__name__}). Restart every worker.") \
                from e
        start = int(epoch_var.numpy())
        if manager is not None and start > initial_epoch:
            # 1-based, as the progress lines count epochs for people.
            log.warning("worker %d: resuming at epoch %d/%d (%d done, backup in %s)", index,
                        start + 1, epochs, start, folder / "backup")

        replicas = strategy.num_replicas_in_sync

        names: list[str] = []  # the logs' names, in the order of the packed vector

        def step_fn(batch, stop):
            x, y, sw = keras.utils.unpack_x_y_sample_weight(batch)
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw,
                                          training=True)
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
            # compute_loss scaled the loss by 1/replicas; the compiled loss tracker
            # is fit's (not updated here), so "loss" comes from this step.
            metrics = {k: v for k, v in model.compute_metrics(x, y, y_pred, sw).items()
                       if k != "loss"}
            names[:] = ["loss", *metrics, "_stop"]
            values = [loss * replicas, *metrics.values(), tf.cast(stop, loss.dtype)]
            return tf.stack([tf.cast(tf.reshape(v, ()), tf.float32) for v in values])

        val_names: list[str] = []

        def val_fn(batch):
            x, y, sw = keras.utils.unpack_x_y_sample_weight(batch)
            y_pred = model(x, training=False)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw,
                                      training=False)
            metrics = {k: v for k, v in model.compute_metrics(x, y, y_pred, sw).items()
                       if k != "loss"}
            val_names[:] = ["val_loss", *(f"val_{k}" for k in metrics)]
            values = [loss * replicas, *metrics.values()]
            return tf.stack([tf.cast(tf.reshape(v, ()), tf.float32) for v in values])

        @tf.function
        def val_step(iterator):
            packed = strategy.run(val_fn, args=(next(iterator),))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, packed, axis=None)

        def validate() -> dict[str, float]:
            model.reset_metrics()
            hooks.on_test_begin()
            it, total, values = iter(val_dist), 0.0, {}
            for step in range(val_steps):
                hooks.on_test_batch_begin(step)
                with deadline.guard("a validation step"):
                    values = dict(zip(val_names, val_step(it).numpy().tolist()))
                total += values["val_loss"]
                values["val_loss"] = total / (step + 1)
                hooks.on_test_batch_end(step, {k[4:]: v for k, v in values.items()})
            hooks.on_test_end({k[4:]: v for k, v in values.items()})
            return values

        @tf.function
        def train_step(iterator, stop):
            # One all-reduce for all the logs and the stop flag: every worker gets
            # the same logs, and a stop asked on any worker stops all at this step.
            packed = strategy.run(step_fn, args=(next(iterator), stop))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, packed, axis=None)

        hooks = keras.callbacks.CallbackList(
            callbacks, add_history=True, add_progbar=bool(verbose) and is_chief, model=model,
            verbose=verbose if is_chief else 0, epochs=epochs, steps=steps)
        model.stop_training = False
        hooks.on_train_begin()
        iterator = iter(dist) if persistent else None
        logs: dict[str, float] = {}
        epoch = saved = start
        best = math.inf
        try:
            for epoch in range(start, epochs):
                model.reset_metrics()
                hooks.on_epoch_begin(epoch)
                if not persistent:
                    iterator = iter(dist)
                total, seen = 0.0, 0
                for step in range(steps):
                    hooks.on_train_batch_begin(step)
                    with deadline.guard("a training step"):
                        packed = train_step(iterator, tf.constant(bool(model.stop_training)))
                        values = dict(zip(names, packed.numpy().tolist()))
                    stop = values.pop("_stop") > 0
                    total, seen = total + values["loss"], seen + 1
                    logs = {**values, "loss": total / seen}  # running mean, as fit shows
                    hooks.on_train_batch_end(step, logs)
                    if stop:
                        model.stop_training = True
                        break
                if val_dist is not None and val_steps:
                    logs = {**logs, **validate()}
                epoch_var.assign(epoch + 1)
                if manager is not None:
                    # All workers save (reading synced-on-read variables, e.g.
                    # metrics, is a collective); only the chief's copy is kept.
                    with deadline.guard("a checkpoint save"):
                        manager.save()
                        into = folder if is_chief else _scratch_dir(folder, index)
                        model.save(str(into / "last.keras"))
                        val_loss = logs.get("val_loss", math.inf)
                        if val_loss < best:  # the same logs on every worker: the same choice
                            best = val_loss
                            model.save(str(into / "best.keras"))
                    saved = epoch + 1
                hooks.on_epoch_end(epoch, dict(logs))
                if model.stop_training:
                    break
        except _COLLECTIVE_ERRORS as e:
            # Epochs counted from 1, as the progress lines and the resume log show them.
            raise WorkerLost(
                f"worker {index} of {workers}: the cluster lost a worker or timed out in epoch "
                f"{epoch + 1}/{epochs} ({type(e).__name__}). Restart every worker"
                + (f"; training resumes at epoch {saved + 1}." if manager is not None
                   else "; without checkpoint_dir it starts again at epoch 1.")) from e
        if manager is not None:
            if not is_chief:
                shutil.rmtree(_scratch_dir(folder, index), ignore_errors=True)
            elif epoch_var.numpy() >= epochs:
                shutil.rmtree(folder / "backup", ignore_errors=True)
        hooks.on_train_end(dict(logs))
    return model.history

