"""The forward pass on Keras' TensorFlow backend.

`TensorFlowForward` owns everything the Predictor's worker thread does with
TensorFlow: an immutable snapshot of the model's variables (one weight
version), the traced `stateless_call` that runs the model on them, and
DLPack views of the batch buffers. How each pass reaches TensorFlow is
chosen at warm-up by `_tf_private.fast_call`, the one home of TensorFlow's
private calls. It is created and used on the worker thread only (Keras marks
the TensorFlow backend not thread-safe); tracing and warm-up happen under a
process-wide lock.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_tandem.serving import _tf_private
from keras_tandem.serving._forward import (
    ForwardPass,
    accepts_training,
    name_outputs,
    output_names,
    pattern,
    variable_value,
)
from keras_tandem.serving._signature import ArraySpec, InputSignature, to_numpy_dtype

_TRACE_LOCK = threading.Lock()


class TensorFlowForward(ForwardPass):
    """A model's forward pass on TensorFlow, traced once, over a weight snapshot it owns.

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

        super().__init__(model, signature, max_rows)
        self._tf = tf
        with _TRACE_LOCK:
            trainable = [tf.constant(variable_value(v)) for v in model.trainable_variables]
            non_trainable = [tf.constant(variable_value(v))
                             for v in model.non_trainable_variables]
            self._trainable, self._non_trainable = trainable, non_trainable

            # stateless_call hands `training` straight to call(), which need not take it.
            call_kwargs = {"training": False} if accepts_training(model) else {}

            def forward(trainable, non_trainable, inputs):
                self.traces += 1  # runs at trace time only
                # Inside a scope, as Keras' own predict step runs: a layer's scope
                # would otherwise be a root scope, and TensorFlow refuses some
                # names there (a class `_Scale` gives '__scale').
                with tf.name_scope("predictor"):
                    outputs, _ = model.stateless_call(trainable, non_trainable, inputs,
                                                      **call_kwargs)
                return outputs

            fn = tf.function(forward, jit_compile=jit_compile)
            weight_sig = ([tf.TensorSpec(t.shape, t.dtype) for t in trainable],
                          [tf.TensorSpec(t.shape, t.dtype) for t in non_trainable])

            def input_sig(rows):
                return signature.pack([
                    tf.TensorSpec((rows, *f.shape), tf.string if f.is_string else f.dtype)
                    for f in signature.fields])

            if jit_compile:
                fns = {b: fn.get_concrete_function(*weight_sig, input_sig(b))
                       for b in self.buckets}
            else:
                one = fn.get_concrete_function(*weight_sig, input_sig(None))
                fns = {b: one for b in self.buckets}
            self._output_structure = fns[self.buckets[0]].structured_outputs
            self.output_specs = self._describe_outputs(model)
            self._flat_weights = [*trainable, *non_trainable]
            # The traced function takes inputs flattened as tf.nest does (dict
            # keys sorted), which need not be the model's order of inputs.
            self._input_order = tf.nest.flatten(signature.pack(list(range(len(self.buffers)))))
            self._views = self._buffer_views()
            plan = self._warm_up(fns, jit_compile)
            self._plan = plan  # holds the concrete functions the callers run
            self._calls = plan.callers
            self.call_path = plan.path
            self.executor = plan.executor
            self._feeds_numpy = plan.feeds_numpy
            if plan.feeds_numpy:
                # What the session's callers are fed: NumPy views of the
                # weights and of the buffers' first rows (aligned: not copied).
                self._flat_weights = [np.asarray(t) for t in self._flat_weights]
                self._views = {b: [self.buffers[i][:b] for i in self._input_order]
                               for b in self.buckets}

    def _describe_outputs(self, model: Any) -> tuple[ArraySpec, ...]:
        tf = self._tf
        flat = tf.nest.flatten(self._output_structure)
        leaves = [(tuple(t.shape)[1:], to_numpy_dtype(t.dtype)) for t in flat]
        indices = tf.nest.pack_sequence_as(self._output_structure, list(range(len(flat))))
        return name_outputs(indices, leaves, output_names(model))

    def _buffer_views(self) -> dict[int, list[Any]] | None:
        """Per bucket, tensors that view the first rows of the batch buffers.

        Made once through DLPack, which shares memory where a conversion
        would copy: a batch is then written into the buffers and run with
        no tensor created on the way in. Converting the batch cost as much
        CPU per forward pass under training (cold caches) as a small model's
        pass. None where DLPack cannot share a buffer (e.g. string inputs):
        each batch is then converted.
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

    def _warm_up(self, fns: dict[int, Any], jit_compile: bool) -> _tf_private.CallPlan:
        # First runs allocate and pick kernels; `fast_call` makes them while
        # it checks each way of calling against the public one. Patterned
        # rows (not zeros) make a mix-up of rows or inputs show.
        patterned = [b for b in self.buffers if b.dtype.kind in "fiub"]
        for b in patterned:
            b[:] = pattern(b.shape, b.dtype)
        try:
            args = {b: self._args(b) for b in self.buckets}
            # XLA-compiled functions run on the calling thread already, and
            # the inline executor does not take them.
            return _tf_private.fast_call(fns, args, inline_executor=not jit_compile,
                                         call_op=not jit_compile, session=not jit_compile)
        finally:
            for b in patterned:
                b.fill(0)

    def _args(self, bucket: int) -> list[Any]:
        if self._views is not None:
            return [*self._flat_weights, *self._views[bucket]]
        constant = self._tf.constant
        buffers = self.buffers
        return [*self._flat_weights, *(constant(buffers[i][:bucket]) for i in self._input_order)]

    def worker_scope(self) -> contextlib.AbstractContextManager:
        """The executor chosen at warm-up (TensorFlow keeps it per thread: the worker's only)."""
        return _tf_private.executor_scope(self.executor)

    def run(self, bucket: int) -> list[np.ndarray]:
        """Runs the first `bucket` rows of the batch buffers through the model.

        Returns:
            The model's outputs, flattened, as NumPy arrays of `bucket` rows.
        """
        if self._feeds_numpy:
            # NumPy in and out; an output may still view a fed buffer.
            outputs = self._calls[bucket]([*self._flat_weights, *self._views[bucket]])
            return [self._own(o) for o in outputs]
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

    def pack_outputs(self, flat: Sequence[Any]) -> Any:
        """Puts flat per-output values back in the structure the model returns."""
        return self._tf.nest.pack_sequence_as(self._output_structure, list(flat))

    @property
    def single_output(self) -> bool:
        """Whether the model returns one tensor (not a list or dict)."""
        return not self._tf.nest.is_nested(self._output_structure)

    def set_weights(self, arrays: Sequence[np.ndarray]) -> None:
        """Swaps in a new weight snapshot (worker thread, between batches)."""
        constant = self._tf.constant
        trainable = list(self._trainable)
        non_trainable = list(self._non_trainable)
        for (is_trainable, index), value in zip(self.layout, arrays):
            target = trainable if is_trainable else non_trainable
            target[index] = constant(value)
        self._trainable, self._non_trainable = trainable, non_trainable
        flat = [*trainable, *non_trainable]
        self._flat_weights = [np.asarray(t) for t in flat] if self._feeds_numpy else flat
