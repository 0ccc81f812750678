"""What a user passes as training data, turned into `tf.data` datasets.

Shared by both training loops: `background.py` (Keras's `fit`) and
`_multiworker.py` (our loop under `MultiWorkerMirroredStrategy`). This module
owns the array dataset, the generator dataset, their `tf.data` options and
the validation split; each loop owns its batch sizes and its arguments.

The options: autotune off, because destroying a used tf.data iterator while
autotune is on can stall until autotune's next wake-up (up to seconds), and
these pipelines only slice arrays or pull batches; auto-sharding by DATA,
because under a multi-worker strategy every worker builds the same pipeline
and keeps its share of each global batch (arrays and generators cannot be
sharded by file).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf


def data_options() -> tf.data.Options:
    """The options of every dataset built here (see the module docstring)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def is_arrays(data: Any) -> bool:
    """Whether `data` is a tuple `(x, y)` or `(x, y, sample_weight)` of arrays."""
    return isinstance(data, tuple) and len(data) in (2, 3) and not any(
        isinstance(d, (tf.data.Dataset, Iterator)) for d in data)


def rows(structure: Any) -> int:
    """The number of rows of an array, or of the first array of a structure."""
    return int(np.shape(tf.nest.flatten(structure)[0])[0])


def take_arrays(data: tuple, kwargs: dict[str, Any]) -> tuple:
    """`(x, y[, sample_weight])` of `data`, with a `sample_weight` of `kwargs` (popped) last."""
    arrays = tuple(d for d in data if d is not None)
    sample_weight = kwargs.pop("sample_weight", None)
    if sample_weight is not None:
        arrays = (*arrays[:2], sample_weight)
    return arrays


def split_validation(arrays: tuple, split: float) -> tuple[tuple, tuple]:
    """`(training, validation)`: as Keras does it, the last `split` of the rows, unshuffled."""
    cut = math.floor(rows(arrays) * (1.0 - split))

    def part(rows_: slice) -> tuple:
        return tuple(None if d is None else tf.nest.map_structure(lambda a: a[rows_], d)
                     for d in arrays)

    return part(slice(None, cut)), part(slice(cut, None))


def array_dataset(arrays: tuple, batch_size: int, *, shuffle: bool, seed: int | None = None,
                  repeat: bool = False) -> tf.data.Dataset:
    """Batches of `arrays` (x, y[, sample_weight]), reshuffled each epoch if asked.

    Args:
        arrays: the arrays, same number of rows each.
        batch_size: rows per batch.
        shuffle: reshuffle the rows at each pass.
        seed: the shuffle seed (the same on every worker gives one order for all).
        repeat: repeat for ever, whole batches only (one iterator for every
            epoch); else one pass, the last batch possibly smaller.

    Returns:
        The dataset, with `data_options()`.
    """
    indices = tf.data.Dataset.range(rows(arrays))
    if shuffle:
        indices = indices.shuffle(rows(arrays), seed=seed, reshuffle_each_iteration=True)
    indices = indices.repeat().batch(batch_size, drop_remainder=True) if repeat \
        else indices.batch(batch_size)
    # The arrays are one dataset element, stored once; each batch gathers rows.
    data = tf.data.Dataset.from_tensors(arrays).repeat()
    ds = tf.data.Dataset.zip(indices, data).map(
        lambda i, d: tf.nest.map_structure(lambda a: tf.gather(a, i), d))
    return ds.prefetch(2).with_options(data_options())


def generator_dataset(gen: Iterator) -> tf.data.Dataset:
    """A dataset over a Python iterator of batches; single pass, as Keras makes it.

    Raises:
        ValueError: the iterator yields no batch (its first one gives the signature).
    """
    try:
        first = next(gen)
    except StopIteration:
        raise ValueError("The data generator yielded no batch.") from None

    def as_tuple(batch):
        return tuple(batch) if isinstance(batch, list) else batch

    first = as_tuple(first)
    signature = tf.nest.map_structure(
        lambda a: tf.TensorSpec((None, *np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype)),
        first)
    pending = [first]

    def source():
        while pending:
            yield pending.pop()
        for batch in gen:
            yield as_tuple(batch)

    ds = tf.data.Dataset.from_generator(source, output_signature=signature)
    return ds.prefetch(2).with_options(data_options())
