"""The input probe: does training wait for its input pipeline?

Owns `probe_input` / `InputProbe`: measures the pipeline alone and the model's
train step on cached batches, and says whether the input is the bottleneck.
`_Iteration` iterates a dataset and hands the used iterator to a daemon thread
to destroy: with autotune on, destroying a used iterator can block until the
autotune thread's next wake-up (intervals double from 20 ms to over 5 s), which
would otherwise land in the caller's wait.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import tensorflow as tf
except ImportError as e:  # JAX or PyTorch alone: say what is missing, not just its name
    raise ImportError(
        "keras_tandem.probe_input measures tf.data pipelines and needs TensorFlow, which is not "
        "installed: pip install keras-tandem (TensorFlow is its default backend). "
        "On JAX or PyTorch without TensorFlow, there is no tf.data pipeline to probe.") from e


@dataclass(frozen=True)
class InputProbe:
    """What `probe_input` measured. `str(probe)` is the one-line verdict.

    Attributes:
        input_batches_per_s: batches/s the pipeline delivers alone.
        input_samples_per_s: examples/s the pipeline delivers alone.
        model_batches_per_s: train steps/s on cached batches (no model: None).
        model_samples_per_s: examples/s trained on cached batches.
        expected_slowdown: estimated step time with this input over the step
            time on cached batches (1.0: the input costs nothing). The step
            waits for a slower pipeline, and the pipeline's CPU time adds to
            the step in proportion to the share of the cores the step keeps
            busy (`model_cpu_s` over the step time and the usable cores, at
            most 1): on a small CPU host the preprocess competes with the
            train step for the cores, while idle cores (a GPU step, or a
            step that uses a few of many cores) take it for free.
        input_bound: whether `expected_slowdown` exceeds 1 + tolerance (None
            without a model).
        verdict: one line saying so, with the figures.
        batches: batches timed for each measurement.
        input_cpu_s: process CPU seconds per batch while the pipeline ran alone.
        model_cpu_s: process CPU seconds per train step on cached batches.
    """

    input_batches_per_s: float
    input_samples_per_s: float
    model_batches_per_s: float | None
    model_samples_per_s: float | None
    expected_slowdown: float | None
    input_bound: bool | None
    verdict: str
    batches: int
    input_cpu_s: float
    model_cpu_s: float | None

    def __str__(self) -> str:
        return self.verdict


def probe_input(dataset: tf.data.Dataset, model: Any = None, *, batches: int = 20,
                warmup: int = 3, max_seconds: float = 5.0,
                tolerance: float = 0.1) -> InputProbe:
    """Measures whether training on `dataset` would be input-bound.

    Times the pipeline alone, then (with a model) the model's train step on a
    few of the pipeline's batches held in memory, and compares them. The
    model's weights, optimizer state and metrics are restored afterwards; do
    not probe a model that another thread is training.

    Args:
        dataset: a dataset of batches, such as `make_pipeline` returns.
        model: a compiled Keras model that trains on these batches, or None
            to measure the pipeline only.
        batches: batches to time for each measurement (after `warmup`).
        warmup: batches fetched (and steps run) before timing: pipeline
            start-up and tracing.
        max_seconds: stop each measurement after about this long.
        tolerance: input-bound means an expected slowdown above 1 + this.

    Returns:
        An `InputProbe`; `str()` of it is the verdict.

    Raises:
        ValueError: the dataset yields fewer than `warmup + 2` batches, or the
            model is not compiled.
    """
    if model is not None and getattr(model, "optimizer", None) is None:
        raise ValueError("probe_input needs a compiled model (it times the train step).")
    held: list[Any] = []
    with _Iteration(dataset) as it:
        for _ in range(warmup):
            batch = next(it, None)
            if batch is None:
                break
            held.append(batch)
        t0, c0 = time.perf_counter(), time.process_time()
        timed = samples = 0
        while timed < batches and time.perf_counter() - t0 < max_seconds:
            batch = next(it, None)
            if batch is None:
                break
            timed += 1
            samples += _rows(batch)
            if len(held) < 8:
                held.append(batch)
        t1, c1 = time.perf_counter(), time.process_time()  # before the iterator is released
    if timed < 2:
        raise ValueError(f"probe_input needs at least warmup + 2 = {warmup + 2} batches; "
                         f"the dataset gave {len(held[:warmup]) + timed}.")
    in_rate, in_cpu = timed / (t1 - t0), (c1 - c0) / timed
    in_samples = samples / (t1 - t0)
    if model is None:
        verdict = (f"input pipeline alone: {in_rate:,.1f} batches/s ({in_samples:,.0f} "
                   f"samples/s); pass a compiled model to compare with its train step")
        return InputProbe(in_rate, in_samples, None, None, None, None, verdict, timed,
                          in_cpu, None)

    m_rate, m_cpu, m_samples = _time_train_steps(model, held, batches, warmup, max_seconds)
    t_in, t_model = 1 / in_rate, 1 / m_rate
    cores = _usable_cores()
    slowdown = _expected_slowdown(t_in, t_model, in_cpu, m_cpu, cores)
    bound = slowdown > 1 + tolerance
    if not bound:
        verdict = (f"not input-bound: the pipeline delivers {in_rate:,.1f} batches/s, "
                   f"{in_rate / m_rate:.1f}x the {m_rate:,.1f} train steps/s on cached data")
    elif t_in / t_model >= slowdown:  # the pipeline alone is the slower
        verdict = (f"input-bound: the pipeline delivers {in_rate:,.1f} batches/s but the "
                   f"model trains {m_rate:,.1f} steps/s on cached data; expect about "
                   f"{slowdown:.1f}x the compute-only epoch time (parallelise, vectorise or "
                   "cache the preprocess; io_threads for waits)")
    else:
        verdict = (f"input-bound: the pipeline needs {in_cpu * 1e3:,.1f} ms of CPU per batch "
                   f"beside a {t_model * 1e3:,.1f} ms train step that keeps "
                   f"{_busy_share(m_cpu, t_model, cores):.0%} of {cores} cores busy; "
                   f"expect about {slowdown:.1f}x the compute-only epoch time (cache or "
                   "vectorise the preprocess)")
    return InputProbe(in_rate, in_samples, m_rate, m_samples, slowdown, bound, verdict, timed,
                      in_cpu, m_cpu)


def _expected_slowdown(t_in: float, t_model: float, in_cpu: float, m_cpu: float,
                       cores: int) -> float:
    """Step time fed by the pipeline over the step time on cached batches (see InputProbe).

    Args:
        t_in: seconds per batch of the pipeline alone.
        t_model: seconds per train step on cached batches.
        in_cpu: CPU seconds per batch of the pipeline alone.
        m_cpu: CPU seconds per train step on cached batches.
        cores: cores this process may use.
    """
    return max(t_in, t_model + in_cpu * _busy_share(m_cpu, t_model, cores)) / t_model


def _busy_share(m_cpu: float, t_model: float, cores: int) -> float:
    """The share of the usable cores a train step keeps busy (at most 1)."""
    return min(1.0, m_cpu / (t_model * max(1, cores)))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _time_train_steps(model, held, batches, warmup, max_seconds):
    """Returns (steps/s, CPU seconds per step, samples/s) of `fit` on the `held` batches."""
    import keras

    size = _rows(held[0])
    held = [b for b in held if _rows(b) == size]  # one shape: no retracing
    stacked = tf.nest.map_structure(lambda *parts: tf.stack(parts), *held)
    cached = tf.data.Dataset.from_tensor_slices(stacked).repeat()
    options = tf.data.Options()
    options.autotune.enabled = False  # no autotune thread: no teardown stall
    cached = cached.with_options(options)
    warmup = max(1, warmup)
    marks: list[tuple[float, float]] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch >= warmup - 1:
                marks.append((time.perf_counter(), time.process_time()))
                if len(marks) > 2 and marks[-1][0] - marks[0][0] > max_seconds:
                    self.model.stop_training = True

    optimizer = model.optimizer
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    state = list(model.variables) + list(optimizer.variables)
    saved = [np.array(v) for v in state]
    history = getattr(model, "history", None)
    try:
        model.fit(cached, steps_per_epoch=warmup + batches, epochs=1, verbose=0,
                  shuffle=False, callbacks=[Timer()])
    finally:
        for v, value in zip(state, saved):
            v.assign(value)
        model.reset_metrics()
        model.stop_training = False
        if history is not None:
            model.history = history
    (t0, c0), (t1, c1) = marks[0], marks[-1]
    steps = len(marks) - 1
    return steps / (t1 - t0), (c1 - c0) / steps, steps * size / (t1 - t0)


def _rows(batch: Any) -> int:
    first = tf.nest.flatten(batch)[0]
    return int(first.shape[0]) if first.shape.rank else 1


class _Iteration:
    """Iterates a dataset; on exit, destroys the iterator on a daemon thread.

    The iterator lives only in `self._box`, so emptying the box on another
    thread runs its (possibly blocking) destructor there, with the GIL released.

    Args:
        dataset: the `tf.data.Dataset` to iterate.
    """

    def __init__(self, dataset: tf.data.Dataset):
        self._box: list[Any] = [iter(dataset)]

    def __enter__(self) -> _Iteration:
        return self

    def __iter__(self) -> _Iteration:
        return self

    def __next__(self) -> Any:
        return next(self._box[0])

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Releases the iterator without waiting for its teardown."""
        box, self._box = self._box, []
        if box:
            threading.Thread(target=box.clear, name="keras-tandem-release-iterator",
                             daemon=True).start()
