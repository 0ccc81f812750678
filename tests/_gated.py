"""A model whose forward pass blocks until a gate is set: a stuck worker on demand."""

import threading

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
# What `Predictor.stats()["call_path"]` says when the backend's fast pass serves.
FAST_PATH = {"tensorflow": "session", "jax": "jax jit", "torch": "torch inference_mode"}[BACKEND]
tf_only = pytest.mark.skipif(BACKEND != "tensorflow",
                             reason="TensorFlow-specific (tf ops, string tensors, XLA flag)")


def host_call(fn, like, *args):
    """Calls the NumPy function `fn(*args)` on the host inside a model's call, on any backend.

    Its result has the shape and dtype of `like`; it runs in a traced pass
    too (`tf.numpy_function`, `jax.pure_callback`; PyTorch runs eagerly).
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        out = tf.numpy_function(lambda *a: np.asarray(fn(*a), like.dtype.name),
                                list(args), like.dtype, stateful=True)
        out.set_shape(like.shape)
        return out
    if BACKEND == "jax":
        import jax

        return jax.pure_callback(lambda *a: np.asarray(fn(*a), like.dtype),
                                 jax.ShapeDtypeStruct(like.shape, like.dtype), *args)
    result = fn(*(a.detach().cpu().numpy() for a in args))
    return keras.ops.convert_to_tensor(np.asarray(result), dtype=str(like.dtype).split(".")[-1])


class GatedModel(keras.Model):
    """Blocks its forward pass until `gate` is set; fails on an input of 666."""

    def __init__(self, gate):
        super().__init__()
        self.dense = keras.layers.Dense(2)
        self.gate = gate

    def call(self, x):
        y = self.dense(x)

        def run(a, xs):
            if (xs == 666).any():
                raise ValueError("the model refuses 666")
            self.gate.wait(20)
            return a

        return host_call(run, y, y, x)


def open_gated_model():
    """A built `GatedModel` (3 features in) and its gate, set: it answers until cleared."""
    gate = threading.Event()
    gate.set()
    model = GatedModel(gate)
    model(np.zeros((1, 3), np.float32))
    return model, gate
