"""Input pipelines: tuned `tf.data` datasets.

Owns `make_pipeline`: builds a `tf.data.Dataset` of batches from NumPy arrays,
file patterns or a Python generator, in a fixed stage order (source, decode,
cache, shuffle, repeat, preprocess, batch, prefetch) with parallel maps and
options set. Whether training waits for such a pipeline is `probe.py`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

try:
    import tensorflow as tf
except ImportError as e:  # JAX or PyTorch alone: say what is missing, not just its name
    raise ImportError(
        "keras_tandem.make_pipeline builds tf.data pipelines and needs TensorFlow, which is not "
        "installed: pip install keras-tandem (TensorFlow is its default backend). "
        "On JAX or PyTorch without TensorFlow, give fit NumPy arrays or a "
        "keras.utils.PyDataset.") from e

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
