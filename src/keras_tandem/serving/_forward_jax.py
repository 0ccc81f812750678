"""The forward pass on Keras' JAX backend.

`JaxForward` owns everything the Predictor's worker thread does with JAX:
one `jax.jit` of `model.stateless_call`, compiled once per batch-size bucket
at warm-up, and the serving weight version as two lists of device arrays
(trainable, non-trainable) handed to it as an argument. JAX arrays are
immutable and nothing is donated, so a weight version is a value: swapping
it replaces the lists by reference, and a batch computed with one version
cannot see another. Keras' own JAX trainer purges and donates the model's
variables while `fit` runs (`_purge_model_variables`); this pass never reads
them after construction, so a running `fit` cannot break it.

New weights are copied to the device in the caller's thread (`check_weights`,
`jax.device_put`); the worker only swaps the lists between two batches.
Created and used on the worker thread, except `check_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_tandem.serving._forward import StatelessForward, accepts_training, variable_value
from keras_tandem.serving._signature import InputSignature


class JaxForward(StatelessForward):
    """A model's forward pass under `jax.jit`, over a weight version it owns.

    Args:
        model: a built Keras model (JAX backend).
        signature: its `InputSignature`.
        max_rows: the largest batch (rows) the worker will run.

    Raises:
        ValueError: the model takes string inputs (JAX has no string arrays).
    """

    call_path = "jax jit"
    _no_strings = "JAX has no string arrays for the model's string inputs"

    def __init__(self, model: Any, signature: InputSignature, max_rows: int):
        import jax
        import keras

        super().__init__(model, signature, max_rows)
        self._jax = jax
        self._trainable = [jax.device_put(variable_value(v)) for v in model.trainable_variables]
        self._non_trainable = [jax.device_put(variable_value(v))
                               for v in model.non_trainable_variables]
        # stateless_call hands `training` straight to call(), which need not take it.
        call_kwargs = {"training": False} if accepts_training(model) else {}

        def forward(trainable, non_trainable, inputs):
            self.traces += 1  # runs at trace time only: once per bucket
            outputs, _ = model.stateless_call(trainable, non_trainable, inputs, **call_kwargs)
            return outputs

        self._fn = jax.jit(forward)  # no donate_argnums: a weight version is shared
        self._tree = keras.tree
        self._warm_up(model)

    def _finish(self, outputs: Any) -> Any:
        return self._jax.block_until_ready(outputs)

    def _call(self, bucket: int) -> Any:
        inputs = self.signature.pack([b[:bucket] for b in self.buffers])
        return self._fn(self._trainable, self._non_trainable, inputs)

    def run(self, bucket: int) -> list[np.ndarray]:
        """Runs the first `bucket` rows of the batch buffers through the model.

        Returns:
            The model's outputs, flattened, as writable NumPy arrays of
            `bucket` rows.
        """
        outputs = self._tree.flatten(self._call(bucket))
        # np.asarray of a CPU array is a read-only view: callers get their own
        # writable rows, as on TensorFlow.
        return [np.array(o) for o in outputs]

    def check_weights(self, arrays: Sequence[Any]) -> list[Any]:
        """Checks arrays against the model's weights and copies them to the device.

        Runs in the caller's thread (`update_weights`), so the worker only
        swaps references.

        Returns:
            One JAX array per weight, in the order of `model.weights`.

        Raises:
            ValueError: if the count, a shape or a dtype does not fit.
        """
        put = self._jax.device_put
        return [put(a) for a in super().check_weights(arrays)]
