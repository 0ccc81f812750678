"""Input pipelines: tuned `tf.data` datasets, and a probe that says whether training waits for them.

Owns:
- `make_pipeline`: builds a `tf.data.Dataset` of batches from NumPy arrays, file
  patterns or a Python generator, in a fixed stage order (source, decode, cache,
  shuffle, repeat, preprocess, batch, prefetch) with parallel maps and options set.
- `probe_input` / `InputProbe`: measures the pipeline alone and the model's train
  step on cached batches, and says whether the input is the bottleneck.
- `_Iteration`: iterates a dataset and hands the used iterator to a daemon thread
  to destroy. With autotune on, destroying a used iterator can block until the
  autotune thread's next wake-up (intervals double from 20 ms to over 5 s), which
  would otherwise land in the caller's wait.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
# Shuffle buffer for `shuffle=True` when the number of elements is unknown.
DEFAULT_SHUFFLE_BUFFER = 10_000
_READERS = ("file", "tfrecord")


def make_pipeline(
    source: Any,
    *,
    batch_size: int,
    preprocess: Callable[..., Any] | None = None,
    vectorized: bool = False,
    decode: Callable[..., Any] | None = None,
    reader: str = "file",
    output_signature: Any = None,
    shuffle: bool | int = False,
    seed: int | None = None,
    cache: bool | str = False,
    cache_preprocessed: bool = False,
    repeat: bool | int = False,
    deterministic: bool = False,
    drop_remainder: bool = False,
    io_threads: int | None = None,
    service: str | None = None,
    service_sharding: str = "dynamic",
    service_job_name: str | None = None,
) -> tf.data.Dataset:
    """Builds a tuned `tf.data.Dataset` of batches.

    Stages, in this order: source, `decode` (parallel), `cache`, `shuffle`,
    `repeat`, `preprocess` (parallel, per element), `batch`, prefetch. With
    `vectorized=True` the preprocess runs after `batch`, once per batch: far
    less per-element overhead for TensorFlow ops that accept a batch axis.
    Maps use `num_parallel_calls=AUTOTUNE`; the dataset ends in
    `prefetch(AUTOTUNE)`. With `service=ADDRESS` everything before the
    prefetch runs on the workers of a tf.data service, and this process only
    receives the batches.

    Args:
        source: NumPy arrays: `x`, a tuple `(x, y)` or `(x, y, sample_weight)`,
            or a dict of arrays, sliced along the first axis. A file pattern
            or list of patterns (`str`): each matching file (sorted) is passed
            to `decode`. A generator function (a callable returning an
            iterable; called again for each repetition) or a generator object
            (iterated once), with `output_signature`. A `tf.data.Dataset` of
            single elements is also accepted.
        batch_size: elements per batch.
        preprocess: called like `Dataset.map`: an element `(x, y)` calls
            `preprocess(x, y)`. TensorFlow ops (traced once); wrap Python code
            in `tf.py_function`.
        vectorized: `preprocess` accepts a batch (a leading batch axis) and
            gives the same result as applying it to each element: it then runs
            once per batch. Do not set it for a preprocess that draws one
            random value per call and is meant to draw one per element.
        decode: called on each source element before everything else, in
            parallel: with file sources it gets the file path (`reader="file"`)
            or one serialized record (`reader="tfrecord"`) as a string tensor.
            Required for file sources.
        reader: `"file"` (one element per file) or `"tfrecord"` (files of
            `tf.train.Example` records, read in parallel and interleaved).
        output_signature: `tf.TensorSpec` structure of a generator's elements
            (required for generator sources), as for `Dataset.from_generator`.
        shuffle: `True` for a full shuffle of arrays or file names (the
            buffer holds up to a second copy of the arrays) and a buffer of
            `DEFAULT_SHUFFLE_BUFFER` otherwise; an int for that buffer size;
            `False` to keep the source order. Reshuffled each repetition.
        seed: shuffle seed (with `deterministic=True`, a reproducible order).
        cache: `True` caches in memory, a path caches to files with that
            prefix; the first full pass fills it.
        cache_preprocessed: cache after `preprocess` instead of before it:
            later passes skip the preprocess. Only for a preprocess with no
            randomness (augmentation would then repeat itself).
        repeat: `True` repeats forever (then give `fit` a `steps_per_epoch`),
            an int repeats that many passes, `False` makes one pass.
        deterministic: keep element order through the parallel stages
            (slower when element costs vary); `False` lets the fastest go first.
        drop_remainder: drop a last, smaller batch.
        io_threads: for a `decode` or `preprocess` that mostly waits (remote
            reads, RPCs, `time.sleep` in `tf.py_function`): give the pipeline a
            private pool of this many threads. AUTOTUNE runs at most one call
            per pool thread, and the default pool has one per core.
        service: a tf.data service dispatcher, `grpc://host:port` (see
            `tandem data-service`): the pipeline up to the batches runs on the
            service's workers. Not for generator sources (their Python runs
            in this process).
        service_sharding: how the service splits the data between its
            workers: `"dynamic"` (default: the dispatcher hands out splits of
            the source on demand, so every element is seen exactly once per
            epoch while no worker fails, and faster workers take more) or
            `"off"` (each worker produces the whole dataset), or another
            `tf.data.experimental.service.ShardingPolicy` name.
        service_job_name: share one job (one pass over the data) between
            the consumers that give the same name; default: a job each.

    Returns:
        The `tf.data.Dataset` of batches, ready for `model.fit`.

    Raises:
        ValueError: an argument does not fit the source.
        FileNotFoundError: a file pattern matches no file.
    """
    if batch_size is None or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if reader not in _READERS:
        raise ValueError(f"reader must be one of {_READERS}, got {reader!r}.")
    if io_threads is not None and io_threads < 1:
        raise ValueError(f"io_threads must be >= 1, got {io_threads}.")
    if vectorized and preprocess is None:
        raise ValueError("vectorized=True needs a preprocess function.")
    if cache_preprocessed and not cache:
        raise ValueError("cache_preprocessed=True needs cache=True or a cache path.")
    sharding = _service_sharding(service_sharding) if service else None

    # Shuffling file names is cheaper than a buffer of decoded elements, but a
    # cache would replay the first pass's order: then shuffle after the cache.
    shuffle_names = bool(shuffle) and (reader == "tfrecord" or not cache)
    dataset, kind, size = _source_dataset(source, decode, reader, output_signature,
                                          shuffle_names, seed, deterministic)
    if kind == "iterator" and repeat not in (False, None, 1) and not cache:
        raise ValueError(
            "A generator object can be iterated only once: pass the generator function "
            "(a callable) instead, or cache=True, to repeat it."
        )
    map_kwargs = {"num_parallel_calls": AUTOTUNE, "deterministic": deterministic}
    if decode is not None:
        dataset = dataset.map(decode, **map_kwargs)

    if cache and not cache_preprocessed:
        dataset = _cache(dataset, cache)
    elif cache_preprocessed:
        if vectorized:
            # Cache elements, not batches, so that shuffling still mixes elements.
            dataset = dataset.batch(batch_size).map(preprocess, **map_kwargs).unbatch()
        else:
            dataset = dataset.map(preprocess, **map_kwargs)
        dataset = _cache(dataset, cache)
    if shuffle and not (kind == "files" and reader == "file" and shuffle_names):
        buffer = _shuffle_buffer(shuffle, size)
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat is True:
        dataset = dataset.repeat()
    elif repeat not in (False, None, 1):
        dataset = dataset.repeat(int(repeat))

    run_preprocess = preprocess is not None and not cache_preprocessed
    if run_preprocess and not vectorized:
        dataset = dataset.map(preprocess, **map_kwargs)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder,
                            num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if run_preprocess and vectorized:
        dataset = dataset.map(preprocess, **map_kwargs)
    options = _options(kind, deterministic, io_threads)
    if service:
        if kind in ("generator", "iterator"):
            raise ValueError("A generator source cannot run on a tf.data service (its Python "
                             "runs in this process): use arrays, files or a tf.data.Dataset.")
        # The options travel with the dataset to the service's workers.
        dataset = dataset.with_options(options).apply(tf.data.experimental.service.distribute(
            processing_mode=sharding, service=service, job_name=service_job_name))
    dataset = dataset.prefetch(AUTOTUNE)
    return dataset.with_options(options)


def _service_sharding(name: str) -> Any:
    policy = tf.data.experimental.service.ShardingPolicy
    key = str(name).upper()
    if key == "DISTRIBUTED_EPOCH":  # the older name of DYNAMIC
        key = "DYNAMIC"
    if key not in policy.__members__:
        raise ValueError(f"service_sharding must be one of "
                         f"{[m.lower() for m in policy.__members__]}, got {name!r}.")
    return policy[key]


def _source_dataset(source, decode, reader, output_signature, shuffle_names, seed,
                    deterministic):
    """Returns `(dataset of source elements, kind, number of elements or None)`."""
    if isinstance(source, tf.data.Dataset):
        n = int(source.cardinality())
        return source, "dataset", n if n >= 0 else None
    if _is_patterns(source):
        if decode is None:
            raise ValueError("A file source needs decode=: a function of the file path "
                             "(reader='file') or of one serialized record (reader='tfrecord').")
        files = _glob(source)
        names = tf.data.Dataset.from_tensor_slices(files)
        if shuffle_names:
            names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        if reader == "file":
            return names, "files", len(files)
        records = names.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                                   num_parallel_calls=AUTOTUNE, deterministic=deterministic)
        return records, "files", None
    if callable(source) or isinstance(source, Iterator):
        if output_signature is None:
            raise ValueError(
                "A generator source needs output_signature=, e.g. "
                "(tf.TensorSpec((28, 28), tf.float32), tf.TensorSpec((), tf.int64))."
            )
        kind = "generator"
        if not callable(source):
            it = source
            source, kind = (lambda: it), "iterator"
        return tf.data.Dataset.from_generator(source, output_signature=output_signature), \
            kind, None
    arrays = _as_arrays(source)
    sizes = {_length(a) for a in tf.nest.flatten(arrays)}
    if len(sizes) != 1:
        raise ValueError(f"The arrays of the source have different lengths {sorted(sizes)}: "
                         "every array needs one row per example.")
    return tf.data.Dataset.from_tensor_slices(arrays), "arrays", sizes.pop()


def _length(array: Any) -> int:
    if not array.shape:
        raise ValueError("A source array needs a first axis (one row per example); "
                         f"got a scalar {array!r}.")
    return int(array.shape[0])


def _is_patterns(source: Any) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return True
    return (isinstance(source, (list, tuple)) and len(source) > 0
            and all(isinstance(s, (str, os.PathLike)) for s in source))


def _glob(patterns: Any) -> list[str]:
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    for p in patterns:
        found = sorted(tf.io.gfile.glob(os.fspath(p)))
        if not found:
            raise FileNotFoundError(f"No file matches {os.fspath(p)!r}.")
        files.extend(found)
    return files


def _as_arrays(source: Any) -> Any:
    if isinstance(source, (np.ndarray, tf.Tensor)):
        return source
    if isinstance(source, tuple):
        return tuple(_as_arrays(s) for s in source)
    if isinstance(source, dict):
        return {k: _as_arrays(v) for k, v in source.items()}
    if isinstance(source, list) and source and all(
            isinstance(s, (np.ndarray, tf.Tensor, tuple, dict)) for s in source):
        return tuple(_as_arrays(s) for s in source)  # [x, y] means (x, y)
    try:
        return np.asarray(source)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Cannot use a {type(source).__name__} as a pipeline source: pass NumPy arrays, "
            "file patterns, a generator function (with output_signature) or a tf.data.Dataset."
        ) from e


def _shuffle_buffer(shuffle: bool | int, size: int | None) -> int:
    if shuffle is True:
        return size if size else DEFAULT_SHUFFLE_BUFFER
    if int(shuffle) < 1:
        raise ValueError(f"shuffle must be True, False or a buffer size >= 1, got {shuffle!r}.")
    return int(shuffle)


def _cache(dataset: tf.data.Dataset, cache: bool | str) -> tf.data.Dataset:
    return dataset.cache() if cache is True else dataset.cache(os.fspath(cache))


def _options(kind: str, deterministic: bool, io_threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.parallel_batch = True
    if io_threads is not None:
        options.threading.private_threadpool_size = max(int(io_threads), os.cpu_count() or 1)
    if kind != "files":
        # Only file sources can be sharded by file; say so rather than let AUTO
        # try it and warn under a distribution strategy.
        options.experimental_distribute.auto_shard_policy = \
            tf.data.experimental.AutoShardPolicy.DATA
    return options


# --------------------------------------------------------------------- probe


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
