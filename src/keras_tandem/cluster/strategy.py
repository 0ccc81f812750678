"""Choosing the `tf.distribute` strategy for the hardware at hand.

Owns `choose_strategy` (what to train under) and `describe_strategy` (one
line saying what was picked, also logged). The choice itself is a pure
function of TF_CONFIG and the device lists (`_plan`), so it can be tested
without the hardware. Reading TF_CONFIG is `tf_config.py`'s (one parser for
the strategy, the training loop and users); training under the multi-worker
strategy is `keras_tandem.training`'s (used by `train_in_background`).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

from keras_tandem.cluster.tf_config import _parse

log = logging.getLogger("keras_tandem.cluster.strategy")


# Default bound on one collective (all-reduce) of a multi-worker step; see choose_strategy.
COLLECTIVE_TIMEOUT_S = 120.0
_TIMEOUT_ENV = "KERAS_TANDEM_COLLECTIVE_TIMEOUT_S"
_TIMEOUTS: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def require_tensorflow_backend(feature: str) -> None:
    """Raises a clear error unless Keras runs on TensorFlow (and TensorFlow is installed).

    Args:
        feature: what the caller asked for, named in the message.

    Raises:
        RuntimeError: Keras' backend is JAX, PyTorch or another.
        ImportError: TensorFlow is not installed.
    """
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"keras_tandem.{feature} builds a tf.distribute strategy, which needs Keras' "
            f"TensorFlow backend; this process runs Keras on '{backend}'. Set "
            "KERAS_BACKEND=tensorflow before importing Keras, or on JAX spread training "
            "with keras.distribution (e.g. keras.distribution.DataParallel).")
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise ImportError(f"keras_tandem.{feature} needs TensorFlow: pip install "
                          "keras-tandem (TensorFlow is its default backend).") from e


def choose_strategy(devices: str | Sequence[str] | None = None, *,
                    collective_timeout_s: float | None = None) -> Any:
    """Returns the `tf.distribute.Strategy` to build and train a model under.

    Without `devices`: `MultiWorkerMirroredStrategy` when TF_CONFIG names a
    cluster of more than one worker (it waits until every worker has
    started); else `MirroredStrategy` across all GPUs when there are several,
    `OneDeviceStrategy` on the only GPU, and the default strategy on CPU.
    Several *logical* CPU devices do not change the CPU choice: they share
    the same cores, so mirroring across them only adds synchronisation; ask
    for it with `devices="CPU"`.

    Build and compile the model under `strategy.scope()`; a `Predictor`
    made from that model serves as usual (it keeps its own weight copy).

    Args:
        devices: `"CPU"` or `"GPU"` for every logical device of that type, or
            a list of device names (`["/cpu:0", "/cpu:1"]`): `MirroredStrategy`
            across them when there are several, `OneDeviceStrategy` for one.
            Overrides TF_CONFIG.
        collective_timeout_s: multi-worker only: the most seconds one step
            of `train_in_background`'s loop (a training or validation step,
            a checkpoint save) may wait for the other workers; then this
            worker's collectives are aborted and `join()` raises
            `WorkerLost` (so a survivor of a frozen worker stops instead of
            hanging). Default: the `KERAS_TANDEM_COLLECTIVE_TIMEOUT_S`
            environment variable, else 120. It must exceed the longest pause
            of any worker between two steps (a checkpoint save, the first
            step's tracing). A dead or frozen process is also caught by
            TensorFlow's coordination service heartbeats.

    Returns:
        The strategy; `describe_strategy` says in one line what it is.

    Raises:
        ValueError: TF_CONFIG is malformed or names a parameter-server
            cluster, or `devices` names no device.
        RuntimeError: TF_CONFIG names a cluster but TensorFlow's runtime
            already started: call `choose_strategy()` first in the program.
        RuntimeError: Keras runs on another backend than TensorFlow
            (`tf.distribute` strategies drive TensorFlow only).
    """
    require_tensorflow_backend("choose_strategy")
    import tensorflow as tf

    tf_config = os.environ.get("TF_CONFIG")
    if devices is None and _parse(tf_config).workers > 1:
        # Before anything that initialises TensorFlow's runtime (listing logical
        # devices does): collective ops can only be configured before that.
        # No CommunicationOptions(timeout_seconds=...): TensorFlow's own timeout
        # can crash the process (see keras_tandem.training._multiworker); the
        # training loop enforces this bound instead.
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            raise RuntimeError(
                "TF_CONFIG names a multi-worker cluster, but TensorFlow's runtime already "
                "started: call choose_strategy() before any other TensorFlow work."
            ) from e
        if collective_timeout_s:
            _TIMEOUTS[strategy] = float(collective_timeout_s)
        log.info("choose_strategy: %s", describe_strategy(strategy))
        return strategy
    if isinstance(devices, str) and devices.upper() in ("CPU", "GPU"):
        devices = [d.name for d in tf.config.list_logical_devices(devices.upper())]
        if not devices:
            raise ValueError("choose_strategy(devices=...) found no such logical device.")
    kind, chosen = _plan(
        tf_config,
        gpus=[d.name for d in tf.config.list_logical_devices("GPU")],
        devices=None if devices is None else list(devices),
    )
    if kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy(chosen)
    elif kind == "one_device":
        strategy = tf.distribute.OneDeviceStrategy(chosen[0])
    else:
        strategy = tf.distribute.get_strategy()
    log.info("choose_strategy: %s", describe_strategy(strategy))
    return strategy


def collective_timeout(strategy: Any) -> float:
    """The most seconds one collective of `strategy` may wait for the other workers.

    Args:
        strategy: a strategy, normally made by `choose_strategy`.

    Returns:
        The `collective_timeout_s` given to `choose_strategy`, else the
        `KERAS_TANDEM_COLLECTIVE_TIMEOUT_S` environment variable, else 120.
    """
    try:
        chosen = _TIMEOUTS.get(strategy)
    except TypeError:  # not weak-referenceable, so not one choose_strategy made
        chosen = None
    return chosen or float(os.environ.get(_TIMEOUT_ENV) or COLLECTIVE_TIMEOUT_S)


def describe_strategy(strategy: Any) -> str:
    """One line naming the strategy, its replica count and devices.

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        e.g. `"MirroredStrategy, 2 replicas on CPU:0, CPU:1"`.
    """
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"
    elif type(strategy).__name__ == "_DefaultDistributionStrategy":
        name = "default strategy (no distribution)"
    else:
        name = type(strategy).__name__
    try:
        devices = strategy.extended.worker_devices
    except (AttributeError, RuntimeError):  # the default strategy has none
        devices = ()
    shown = ", ".join(d.split("device:")[-1] for d in devices)
    replicas = strategy.num_replicas_in_sync
    return f"{name}, {replicas} replica{'s' if replicas != 1 else ''}" + \
        (f" on {shown}" if shown else "")


def _plan(tf_config: str | None, gpus: Sequence[str],
          devices: Sequence[str] | None) -> tuple[str, list[str]]:
    """Decides which strategy to build.

    Args:
        tf_config: the TF_CONFIG environment variable (or None).
        gpus: the logical GPU device names.
        devices: devices asked for explicitly, or None.

    Returns:
        `(kind, devices)`: kind is `"multi_worker"`, `"mirrored"`,
        `"one_device"` or `"default"`.
    """
    if devices is not None:
        if not devices:
            raise ValueError("choose_strategy(devices=[]) names no device.")
        return ("mirrored" if len(devices) > 1 else "one_device"), list(devices)
    if _parse(tf_config).workers > 1:
        return "multi_worker", []
    if len(gpus) > 1:
        return "mirrored", list(gpus)
    if len(gpus) == 1:
        return "one_device", list(gpus)
    return "default", []

