"""The forward pass as the Predictor's worker sees it, whatever the backend.

Separation of concerns:
- `ForwardPass` (this module) is the seam between the worker and a Keras
  backend. It owns what every backend shares, in NumPy: the batch-size
  buckets, the aligned batch buffers and filling them from requests,
  checking new weights, and naming the outputs. A backend implements the
  rest: tracing, running a bucket, holding and swapping the serving copy of
  the weights, and the scope the worker runs in.
- `_forward_tf.TensorFlowForward` is the TensorFlow backend's fast pass.
  Others (JAX, PyTorch) go beside it, one file each, and are chosen by
  `make_forward`.
- `_forward_keras.KerasCopyForward` is the fallback for any backend: a copy
  of the model run by Keras' own predict step. Slower, and right wherever
  `model.predict` is.
- `_forward_choice.make_forward` builds a model that was never called, picks
  the pass, and checks the fast one's answers against an eager call of the
  model before trusting it.
- `bucket_sizes` is the one definition of the batch-size buckets; the
  server's batch-size histogram uses the same bounds.

Nothing here imports a backend.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keras_tandem.serving._signature import ArraySpec, InputSignature, to_numpy_dtype

_WARNED: set[object] = set()
_WARNED_LOCK = threading.Lock()


def warn_once(key: object, message: str) -> None:
    """Warns (`RuntimeWarning`) the first time `key` is seen in this process.

    A fallback of the forward pass would be the same for every Predictor of
    the process: said once per reason, not once per Predictor.
    """
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=2)

_ZERO_BYTES_MAX = 16 << 20  # larger padding is zeroed with NumPy instead
_ALIGN = 64  # kernels (TensorFlow's, XLA's) assume tensor memory aligned to this many bytes


def bucket_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a forward pass runs at.

    A batch of n rows is zero-padded to the smallest bucket that holds it,
    so a traced (or compiled) pass sees few distinct shapes.

    Args:
        max_batch_size: the largest batch, in rows.

    Returns:
        The powers of two below `max_batch_size`, then `max_batch_size` itself.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
    sizes = []
    b = 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes


def weight_layout(model: Any) -> list[tuple[bool, int]]:
    """Where each of `model.weights` sits among the model's variables.

    Returns:
        For each weight, in the order of `model.get_weights()`: `(trainable,
        index)` into `model.trainable_variables` or `model.non_trainable_variables`.
    """
    trainable = {id(v): i for i, v in enumerate(model.trainable_variables)}
    non_trainable = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    layout = []
    for w in model.weights:
        if id(w) in trainable:
            layout.append((True, trainable[id(w)]))
        else:
            layout.append((False, non_trainable[id(w)]))
    return layout


def variable_value(v: Any) -> np.ndarray:
    """A NumPy copy of a Keras variable's value, which later training does not change."""
    # Not np.array(v, copy=True): NumPy 2 would hand `copy` to the variable's
    # __array__, which does not take it (a DeprecationWarning per variable).
    return np.array(np.asarray(v))


def _aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an `_ALIGN`-byte boundary.

    A string (object) array holds references, not bytes: it is filled with
    empty strings instead, and its alignment does not matter (no backend
    shares its memory).
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "O":
        return np.full(shape, b"", dtype=object)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def output_names(model: Any) -> list[str] | None:
    """The Keras model's output names, when it has them."""
    try:
        names = list(model.output_names)
    except (AttributeError, ValueError, TypeError):
        return None
    return [str(n) for n in names] or None


def name_outputs(structure: Any, leaves: Sequence[tuple[tuple, np.dtype]],
                 model_names: Sequence[str] | None) -> tuple[ArraySpec, ...]:
    """Names a model's outputs, in the order of the structure it returns.

    Args:
        structure: the outputs' structure with each output replaced by its
            index into `leaves` (an int, a list or tuple, or a dict of them).
        leaves: per-example `(shape, dtype)` of each output, in flat order.
        model_names: the model's output names, if known.

    Returns:
        One `ArraySpec` per output: a dict's outputs named by their keys, a
        single output or a list's by `model_names` where they fit, else
        `output_0`, `output_1`, ...
    """
    if isinstance(structure, Mapping) and all(isinstance(i, int) for i in structure.values()):
        return tuple(ArraySpec(str(k), *leaves[i]) for k, i in structure.items())
    if isinstance(structure, int):
        order = [structure]
    elif isinstance(structure, (list, tuple)) and all(isinstance(i, int) for i in structure):
        order = list(structure)
    else:  # deeper nesting: flat order, generic names
        order = list(range(len(leaves)))
        model_names = None
    names = list(model_names or [])
    if len(names) != len(order):
        names = [f"output_{k}" for k in range(len(order))]
    return tuple(ArraySpec(n, *leaves[i]) for n, i in zip(names, order))


class ForwardPass(abc.ABC):
    """A model's forward pass, traced once, over a weight snapshot it owns.

    Made and used on the Predictor's worker thread only, except
    `check_weights` (any thread). Subclasses trace in `__init__` and leave
    the pass warmed up and ready.

    Args:
        model: a built Keras model.
        signature: its `InputSignature`.
        max_rows: the largest batch (rows) the worker will run.

    Attributes:
        buckets: the batch sizes the pass runs at (`bucket_sizes`).
        bucket_of: for each row count 0..max_rows, the bucket it runs in.
        buffers: per input, a `(max_rows, *shape)` array the batch is copied into.
        traces: how many times the model was traced (constant after warm-up).
        call_path: how each pass reaches the backend (e.g. "call op"); see
            the backend's module.
        executor: the executor the backend runs the pass on ("inline" or "default").
        output_specs: one `ArraySpec` per output, in the model's order.
    """

    call_path: str = "function"
    executor: str = "default"

    def __init__(self, model: Any, signature: InputSignature, max_rows: int):
        self.signature = signature
        self.traces = 0
        self.buckets = bucket_sizes(max_rows)
        self.bucket_of = [0] * (max_rows + 1)
        b = 0
        for n in range(1, max_rows + 1):
            while self.buckets[b] < n:
                b += 1
            self.bucket_of[n] = self.buckets[b]
        self.buffers = [_aligned_zeros((max_rows, *f.shape), f.dtype) for f in signature.fields]
        # String (object) buffers hold references: copied by NumPy, padded with b"".
        self._buffer_bytes = [None if b.dtype.kind == "O" else
                              memoryview(b.reshape(-1).view(np.uint8)) for b in self.buffers]
        self._row_bytes = [0 if b.dtype.kind == "O" else b[0].nbytes for b in self.buffers]
        # Where each buffer's bytes lie, for `_own`'s check of an output.
        self._buffer_spans = [(b.__array_interface__["data"][0],
                               b.__array_interface__["data"][0] + b.nbytes) for b in self.buffers]
        pad_bytes = max(self._row_bytes) * max_rows
        self._zeros = memoryview(bytes(pad_bytes)) if pad_bytes <= _ZERO_BYTES_MAX else None
        self.layout = weight_layout(model)
        self.weight_specs = [(tuple(w.shape), np.dtype(w.dtype)) for w in model.weights]
        self.weight_names = [w.path for w in model.weights]
        self.output_specs: tuple[ArraySpec, ...] = ()

    # ------------------------------------------------------------ the backend

    @abc.abstractmethod
    def run(self, bucket: int) -> list[np.ndarray]:
        """Runs the first `bucket` rows of the batch buffers through the model.

        Returns:
            The model's outputs, flattened, as NumPy arrays of `bucket` rows
            that do not share memory with the buffers.
        """

    @abc.abstractmethod
    def set_weights(self, arrays: Sequence[np.ndarray]) -> None:
        """Swaps in a new weight snapshot (checked arrays; worker thread, between batches)."""

    @abc.abstractmethod
    def pack_outputs(self, flat: Sequence[Any]) -> Any:
        """Puts flat per-output values back in the structure the model returns."""

    @property
    @abc.abstractmethod
    def single_output(self) -> bool:
        """Whether the model returns one tensor (not a list or dict)."""

    def worker_scope(self) -> contextlib.AbstractContextManager:
        """The scope the worker runs every `run` in (backend settings kept per thread)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------ shared, NumPy

    def fill(self, requests: Sequence[Any], rows: int, bucket: int) -> None:
        """Copies the requests' rows into the batch buffers and zero-pads to `bucket`.

        Plain memcpy through byte views: unlike a NumPy copy of this size, it
        keeps the GIL, so the worker does not queue behind every client
        thread to get it back before the forward pass. String inputs are
        object arrays (references, which a byte copy would not count): they
        are copied by NumPy and padded with empty strings.

        Args:
            requests: objects whose `arrays` are, per input, a flat byte view
                (numbers) or an object array of rows (strings).
            rows: their rows in all.
            bucket: the batch size the forward pass runs at (>= rows).
        """
        for k, view in enumerate(self._buffer_bytes):
            if view is None:
                self._fill_objects(k, requests, rows, bucket)
                continue
            pos = 0
            for r in requests:
                data = r.arrays[k]
                end = pos + len(data)
                view[pos:end] = data
                pos = end
            if rows < bucket:  # padding rows are zeros, never stale rows
                pad_end = bucket * self._row_bytes[k]
                if self._zeros is not None:
                    view[pos:pad_end] = self._zeros[:pad_end - pos]
                else:
                    self.buffers[k][rows:bucket] = 0

    def _fill_objects(self, k: int, requests: Sequence[Any], rows: int, bucket: int) -> None:
        buffer = self.buffers[k]
        pos = 0
        for r in requests:
            data = r.arrays[k]
            buffer[pos:pos + len(data)] = data
            pos += len(data)
        if rows < bucket:
            buffer[rows:bucket] = b""

    def check_weights(self, arrays: Sequence[Any]) -> list[np.ndarray]:
        """Checks arrays against the model's weights and copies them.

        Safe to call from any thread (NumPy only).

        Raises:
            ValueError: if the count, a shape or a dtype does not fit.
        """
        arrays = list(arrays)
        if len(arrays) != len(self.weight_specs):
            raise ValueError(
                f"update_weights got {len(arrays)} arrays, but the served model has "
                f"{len(self.weight_specs)} weights ({self._describe_weights()}). Pass a model "
                "of the same architecture or the list its get_weights() returns."
            )
        checked = []
        for i, (a, (shape, dtype), name) in enumerate(
                zip(arrays, self.weight_specs, self.weight_names)):
            a = np.asarray(a)
            if a.shape != shape:
                raise ValueError(
                    f"update_weights: weight {i} ('{name}') has shape {a.shape}, the served "
                    f"model expects {shape}. Is the source the same architecture?"
                )
            if a.dtype.kind not in "fiub":
                raise ValueError(
                    f"update_weights: weight {i} ('{name}') has dtype {a.dtype}, not numeric."
                )
            checked.append(np.array(a, dtype=dtype, copy=True))
        return checked

    def _describe_weights(self) -> str:
        shown = [f"{n} {s}" for n, (s, _) in zip(self.weight_names, self.weight_specs)]
        return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")

    def _own(self, output: np.ndarray) -> np.ndarray:
        """`output`, copied if it views a batch buffer (which the next batch overwrites)."""
        address = output.__array_interface__["data"][0]
        for start, end in self._buffer_spans:
            if start <= address < end:
                return output.copy()
        return output


class StatelessForward(ForwardPass):
    """What the JAX and PyTorch passes share: `stateless_call` over weights they own.

    A subclass names `_no_strings` (the error for a model with string
    inputs), sets `self._tree` (`keras.tree`), keeps the weights in
    `self._trainable` / `self._non_trainable`, and defines `_call(bucket)`
    (the model on the first `bucket` rows of the buffers) and
    `_as_weight(array)` (a checked array as the backend's weight value).
    """

    _tree: Any
    _trainable: list[Any]
    _non_trainable: list[Any]
    _no_strings: str  # why the backend cannot take the model's string inputs

    def __init__(self, model: Any, signature: Any, max_rows: int):
        if any(f.is_string for f in signature.fields):
            raise ValueError(self._no_strings)
        super().__init__(model, signature, max_rows)

    @abc.abstractmethod
    def _call(self, bucket: int) -> Any:
        """The model's outputs, in its own structure, for the first `bucket` rows."""

    def _as_weight(self, array: Any) -> Any:
        return array

    def _numpy_dtype(self, output: Any) -> np.dtype:
        return np.dtype(output.dtype)

    def _warm_up(self, model: Any) -> None:
        """Runs every bucket once, then describes the outputs from the last run.

        Patterned rows (not zeros) make a mix-up of rows show in the checks
        `make_forward` runs next.
        """
        for b in self.buffers:
            b[:] = pattern(b.shape, b.dtype)
        try:
            outputs = None
            for bucket in self.buckets:
                outputs = self._finish(self._call(bucket))
        finally:
            for b in self.buffers:
                b.fill(0)
        tree = self._tree
        self._output_structure = tree.map_structure(lambda _: 0, outputs)
        self._single = not tree.is_nested(self._output_structure)
        flat = tree.flatten(outputs)
        leaves = [(tuple(o.shape)[1:], to_numpy_dtype(self._numpy_dtype(o))) for o in flat]
        indices = tree.pack_sequence_as(self._output_structure, list(range(len(flat))))
        self.output_specs = name_outputs(indices, leaves, output_names(model))

    def _finish(self, outputs: Any) -> Any:
        """Waits for an asynchronous backend's outputs (JAX); others return them."""
        return outputs

    def set_weights(self, arrays: Sequence[Any]) -> None:
        """Swaps in a new weight version (worker thread, between batches)."""
        trainable = list(self._trainable)
        non_trainable = list(self._non_trainable)
        for (is_trainable, index), value in zip(self.layout, arrays):
            (trainable if is_trainable else non_trainable)[index] = self._as_weight(value)
        self._trainable, self._non_trainable = trainable, non_trainable

    def pack_outputs(self, flat: Sequence[Any]) -> Any:
        """Puts flat per-output values back in the structure the model returns."""
        return self._tree.pack_sequence_as(self._output_structure, list(flat))

    @property
    def single_output(self) -> bool:
        """Whether the model returns one tensor (not a list or dict)."""
        return self._single


# ------------------------------------------------- helpers the passes share

_WORDS = np.array([b"a", b"the cat", b"", b"xyz 12"], dtype=object)


def pattern(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Rows whose values differ from row to row, valid for most models.

    Floats cycle through 0..6; integers and booleans through 0 and 1 (a token
    id or class index any vocabulary has); strings through a few words.
    Used for warm-up and for checking a pass's answers: a mix-up of rows or
    inputs shows, where zeros would hide it.
    """
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    if dtype.kind == "O":
        return _WORDS[np.arange(size) % len(_WORDS)].reshape(shape)
    cycle = 7 if dtype.kind in "fc" else 2
    return (np.arange(size) % cycle).astype(dtype).reshape(shape)


def to_tensors(arrays: Sequence[np.ndarray], fields: Sequence[ArraySpec]) -> list[Any]:
    """Backend tensors of per-input arrays (strings as the backend's string tensors)."""
    import keras

    return [keras.ops.convert_to_tensor(a, dtype="string" if f.is_string else f.dtype.name)
            for a, f in zip(arrays, fields)]


def accepts_training(model: Any) -> bool:
    """Whether the model's `call` takes `training` (Keras hands it on only then)."""
    params = inspect.signature(model.call).parameters
    return "training" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_model(model: Any, inputs: Any) -> Any:
    """Calls the model eagerly for inference, as `model.predict` does (`training=False`)."""
    if accepts_training(model):
        return model(inputs, training=False)
    return model(inputs)


def zero_rows(signature: InputSignature, rows: int = 1) -> list[np.ndarray]:
    """Per input, `rows` rows of zeros (empty strings for string inputs)."""
    return [np.full((rows, *f.shape), b"", object) if f.is_string
            else np.zeros((rows, *f.shape), f.dtype) for f in signature.fields]
