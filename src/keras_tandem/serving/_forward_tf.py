"""The compiled forward pass and the serving copy of the weights.

`CompiledForward` owns everything the Predictor's worker thread does with
TensorFlow: an immutable snapshot of the model's variables (one weight
version), the traced `stateless_call` that runs the model on them, the
preallocated batch buffers and the batch-size buckets. It is created and used
on the worker thread only (Keras marks the TensorFlow backend not
thread-safe); tracing happens under a process-wide lock.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keras_tandem.serving._signature import InputSignature

_TRACE_LOCK = threading.Lock()
_ZERO_BYTES_MAX = 16 << 20  # larger padding is zeroed with NumPy instead
_INLINE_EXECUTOR = "SINGLE_THREADED_EXECUTOR"
_ALIGN = 64  # TensorFlow's kernels assume tensor memory aligned to this many bytes


def _aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on a `_ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to `max_batch_size`, and `max_batch_size` itself."""
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


def _variable_value(v: Any) -> np.ndarray:
    return np.array(v, copy=True)


def _accepts_training(model: Any) -> bool:
    params = inspect.signature(model.call).parameters
    return "training" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _flat_caller(fn: Any) -> Callable[[list[Any]], list[Any]]:
    """A fast caller of a concrete function on a flat list of tensors.

    The public `ConcreteFunction.__call__` re-checks the nested structure of
    the arguments on every call, which costs 100-250 us here: as much as the
    forward pass of a small model. `_call_flat` skips that; the arguments are
    built by us, in the traced order, so the check would never fail. Where a
    TensorFlow release lacks it, fall back to the public call.
    """
    import tensorflow as tf

    call_flat = getattr(fn, "_call_flat", None)
    captured = list(getattr(fn, "captured_inputs", ()))
    if call_flat is not None:
        flatten, tensor = tf.nest.flatten, tf.Tensor

        def call(args):
            out = call_flat(args, captured)  # packed in the outputs' structure
            return [out] if isinstance(out, tensor) else flatten(out)

        return call

    spec = fn.structured_input_signature[0]

    def call_public(args):
        return tf.nest.flatten(fn(*tf.nest.pack_sequence_as(spec, args)))

    return call_public


def _direct_caller(fn: Any, executor_type: str, via_call_op: bool = True
                   ) -> Callable[[list[Any]], list[Any]]:
    """A caller that hands a concrete function's flat inputs straight to TensorFlow's executor.

    Under a training load every serving call runs on cold CPU caches, and
    then the Python layers between `_call_flat` and the C++ executor (about
    ten frames, each re-reading the thread's call options) cost more than
    the rest of the call. This does what they end with, once per call: one
    `TFE_Py_Execute` with the attributes fixed when it is made (on the
    worker thread, whose options they are).

    With `via_call_op`, the function runs inside a `PartitionedCall` op
    rather than as itself: TensorFlow runs a function called by name
    asynchronously on its inter-op thread pool and blocks the caller until
    it is done (two thread hand-offs per pass, and the pass queues behind
    training's ops on that shared pool), while a single op, which eager
    mode wraps in a small function of its own, runs synchronously on the
    calling thread. Private TensorFlow API: the caller checks it against
    `_flat_caller` at warm-up and keeps that one where this fails.
    """
    import itertools

    from tensorflow.python import pywrap_tfe
    from tensorflow.python.eager import context, core

    atomic = fn._inference_function
    ctx = context.context()
    ctx.ensure_initialized()
    name = atomic.name.decode() if isinstance(atomic.name, bytes) else str(atomic.name)
    outputs = len(atomic.function_type.flat_outputs)
    options = dict(ctx.function_call_options.as_attrs(), executor_type=executor_type)
    captured = list(fn.captured_inputs)
    if via_call_op:
        signature = atomic.definition.signature
        op = "PartitionedCall"
        attrs = {"Tin": [int(a.type) for a in signature.input_arg],
                 "Tout": [int(a.type) for a in signature.output_arg],
                 "f": name, "config": "", **options}
    else:
        op, attrs = name, options
    attrs = tuple(itertools.chain(*attrs.items()))
    handle, device, execute = ctx._handle, ctx.device_name, pywrap_tfe.TFE_Py_Execute
    not_ok, to_exception = core._NotOkStatusException, core._status_to_exception

    def call(args):
        try:
            return execute(handle, device, op, args + captured if captured else args, attrs,
                           outputs)
        except not_ok as e:
            raise to_exception(e) from None

    return call


class CompiledForward:
    """A model's forward pass, traced once, over a weight snapshot it owns.

    Args:
        model: a built Keras model.
        signature: its `InputSignature`.
        max_rows: the largest batch (rows) the worker will run.
        jit_compile: compile with XLA (one trace per bucket) instead of one
            shape-polymorphic trace.
    """

    def __init__(self, model: Any, signature: InputSignature, max_rows: int,
                 jit_compile: bool = False):
        import tensorflow as tf

        self._tf = tf
        self.traces = 0
        self.signature = signature
        self.buckets = bucket_sizes(max_rows)
        self.bucket_of = [0] * (max_rows + 1)
        b = 0
        for n in range(1, max_rows + 1):
            while self.buckets[b] < n:
                b += 1
            self.bucket_of[n] = self.buckets[b]
        self.buffers = [_aligned_zeros((max_rows, *f.shape), f.dtype) for f in signature.fields]
        self._buffer_bytes = [memoryview(b.reshape(-1).view(np.uint8)) for b in self.buffers]
        self._row_bytes = [b[0].nbytes for b in self.buffers]
        pad_bytes = max(self._row_bytes) * max_rows
        self._zeros = memoryview(bytes(pad_bytes)) if pad_bytes <= _ZERO_BYTES_MAX else None
        self.layout = weight_layout(model)
        self.weight_specs = [(tuple(w.shape), np.dtype(w.dtype)) for w in model.weights]
        self.weight_names = [w.path for w in model.weights]

        with _TRACE_LOCK:
            trainable = [self._constant(_variable_value(v)) for v in model.trainable_variables]
            non_trainable = [self._constant(_variable_value(v))
                             for v in model.non_trainable_variables]
            self._trainable, self._non_trainable = trainable, non_trainable

            # stateless_call hands `training` straight to call(), which need not take it.
            call_kwargs = {"training": False} if _accepts_training(model) else {}

            def forward(trainable, non_trainable, inputs):
                self.traces += 1  # runs at trace time only
                outputs, _ = model.stateless_call(trainable, non_trainable, inputs,
                                                  **call_kwargs)
                return outputs

            fn = tf.function(forward, jit_compile=jit_compile)
            weight_sig = ([tf.TensorSpec(t.shape, t.dtype) for t in trainable],
                          [tf.TensorSpec(t.shape, t.dtype) for t in non_trainable])

            def input_sig(rows):
                return signature.pack([tf.TensorSpec((rows, *f.shape), f.dtype)
                                       for f in signature.fields])

            if jit_compile:
                fns = {b: fn.get_concrete_function(*weight_sig, input_sig(b))
                       for b in self.buckets}
            else:
                one = fn.get_concrete_function(*weight_sig, input_sig(None))
                fns = {b: one for b in self.buckets}
            self._fns = fns
            self._calls = {b: _flat_caller(f) for b, f in fns.items()}
            self._output_structure = fns[self.buckets[0]].structured_outputs
            self._flat_weights = [*trainable, *non_trainable]
            # The traced function takes inputs flattened as tf.nest does (dict
            # keys sorted), which need not be the model's order of inputs.
            self._input_order = tf.nest.flatten(signature.pack(list(range(len(self.buffers)))))
            self._views = self._buffer_views()
            # How each pass reaches TensorFlow: "call op", "direct" or "function"
            # (see `_direct_caller`); set at warm-up.
            self.call_path = "function"
            self.executor_type = self._warm_up(jit_compile)

    def _buffer_views(self) -> dict[int, list[Any]] | None:
        """Per bucket, tensors that view the first rows of the batch buffers.

        Made once through DLPack, which shares memory where a conversion
        would copy: a batch is then written into the buffers and run with
        no tensor created on the way in. Converting the batch cost about
        100 us of CPU per forward pass under training (cold caches), as much
        as a small model's pass. None where DLPack cannot share a buffer
        (e.g. string inputs): each batch is then converted.
        """
        from_dlpack = self._tf.experimental.dlpack.from_dlpack
        try:
            views = {b: [from_dlpack(self.buffers[i][:b].__dlpack__())
                         for i in self._input_order] for b in self.buckets}
            probe = self.buffers[0].reshape(-1)[:1].view(np.uint8)
            before = int(probe[0])
            probe[0] ^= 1
            shared = views[self.buckets[0]][self._input_order.index(0)]
            seen = int(np.asarray(shared).reshape(-1)[:1].view(np.uint8)[0])
            probe[0] = before
        except Exception:  # noqa: BLE001 - no DLPack for these dtypes or this build
            return None
        return views if seen == before ^ 1 else None

    def _warm_up(self, jit_compile: bool) -> str:
        # First runs allocate and pick kernels. Prefer TensorFlow's executor
        # that runs the function's ops inline on the calling thread: for the
        # small graphs of serving it cut the CPU of a call by about a fifth
        # and raised throughput at 64 threads by as much. It does not take
        # every graph (control flow lowered to Switch/Merge), so fall back.
        executor = ""
        if not jit_compile:
            try:
                with self._tf.experimental.function_executor_type(_INLINE_EXECUTOR):
                    for b in self.buckets:
                        self.run(b)
                executor = _INLINE_EXECUTOR
            except Exception:  # noqa: BLE001 - any failure: use the default executor
                pass
        if not executor:
            for b in self.buckets:
                self.run(b)
        self._use_direct_calls(executor, jit_compile)
        return executor

    def _use_direct_calls(self, executor: str, jit_compile: bool) -> None:
        # Keeps the `_flat_caller`s unless the direct ones give the same outputs.
        patterned = [b for b in self.buffers if b.dtype.kind in "fiub"]
        for b in patterned:  # rows that differ, so a mix-up would show
            flat = b.reshape(-1)
            flat[:] = (np.arange(flat.size) % 7).astype(b.dtype)
        try:
            # The call op only where the function is not compiled by XLA: a
            # compiled function runs on the calling thread already.
            for via_call_op in ((False,) if jit_compile else (True, False)):
                direct = self._checked_direct_calls(executor, via_call_op)
                if direct is not None:
                    self._calls = direct
                    self.call_path = "call op" if via_call_op else "direct"
                    return
        finally:
            for b in patterned:
                b.fill(0)

    def _checked_direct_calls(self, executor: str, via_call_op: bool
                              ) -> dict[int, Callable[[list[Any]], list[Any]]] | None:
        """Direct callers per bucket, or None unless they match `_calls` on every bucket."""
        try:
            direct = {b: _direct_caller(f, executor, via_call_op) for b, f in self._fns.items()}
            for b in self.buckets:
                args = [*self._flat_weights, *(self._tf.constant(self.buffers[i][:b])
                                               for i in self._input_order)]
                with self.executor_scope_for(executor):
                    expected = [t.numpy() for t in self._calls[b](args)]
                    got = [t.numpy() for t in direct[b](args)]
                if len(got) != len(expected) or not all(
                        np.array_equal(g, e, equal_nan=True) for g, e in zip(got, expected)):
                    return None
        except Exception:  # noqa: BLE001 - private API moved or refused: keep the public path
            return None
        return direct

    def executor_scope(self) -> contextlib.AbstractContextManager:
        """The scope the worker runs `run` in: the executor chosen at warm-up.

        TensorFlow keeps this setting per thread, so it affects only the
        Predictor's worker, not training or other code in the process.
        """
        return self.executor_scope_for(self.executor_type)

    def executor_scope_for(self, executor: str) -> contextlib.AbstractContextManager:
        """The scope that runs functions on `executor` ("" for TensorFlow's default)."""
        if not executor:
            return contextlib.nullcontext()
        return self._tf.experimental.function_executor_type(executor)

    def _constant(self, value: np.ndarray):
        return self._tf.constant(value)

    def fill(self, requests: Sequence[Any], rows: int, bucket: int) -> None:
        """Copies the requests' rows into the batch buffers and zero-pads to `bucket`.

        Plain memcpy through byte views: unlike a NumPy copy of this size, it
        keeps the GIL, so the worker does not queue behind every client
        thread to get it back before the forward pass.

        Args:
            requests: objects whose `arrays` are flat byte views, one per input.
            rows: their rows in all.
            bucket: the batch size the forward pass runs at (>= rows).
        """
        for k, view in enumerate(self._buffer_bytes):
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

    def run(self, bucket: int) -> list[np.ndarray]:
        """Runs the first `bucket` rows of the batch buffers through the model.

        Returns:
            The model's outputs, flattened, as NumPy arrays of `bucket` rows.
        """
        if self._views is not None:
            args = [*self._flat_weights, *self._views[bucket]]
            outputs = [t.numpy() for t in self._calls[bucket](args)]
            # An output that is an input (an identity model) would view the
            # batch buffer, which the next batch overwrites.
            return [self._own(o) for o in outputs]
        constant = self._tf.constant
        buffers = self.buffers
        args = [*self._flat_weights, *(constant(buffers[i][:bucket]) for i in self._input_order)]
        return [t.numpy() for t in self._calls[bucket](args)]

    def _own(self, output: np.ndarray) -> np.ndarray:
        address = output.__array_interface__["data"][0]
        for b in self.buffers:
            start = b.__array_interface__["data"][0]
            if start <= address < start + b.nbytes:
                return output.copy()
        return output

    def pack_outputs(self, flat: Sequence[Any]) -> Any:
        """Puts flat per-output values back in the structure the model returns."""
        return self._tf.nest.pack_sequence_as(self._output_structure, list(flat))

    @property
    def single_output(self) -> bool:
        """Whether the model returns one tensor (not a list or dict)."""
        return not self._tf.nest.is_nested(self._output_structure)

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

    def set_weights(self, arrays: Sequence[np.ndarray]) -> None:
        """Swaps in a new weight snapshot (worker thread, between batches)."""
        trainable = list(self._trainable)
        non_trainable = list(self._non_trainable)
        for (is_trainable, index), value in zip(self.layout, arrays):
            target = trainable if is_trainable else non_trainable
            target[index] = self._constant(value)
        self._trainable, self._non_trainable = trainable, non_trainable
        self._flat_weights = [*trainable, *non_trainable]

    def _describe_weights(self) -> str:
        shown = [f"{n} {s}" for n, (s, _) in zip(self.weight_names, self.weight_specs)]
        return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")
