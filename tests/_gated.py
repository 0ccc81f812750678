"""A model whose forward pass blocks until a gate is set: a stuck worker on demand."""

import threading

import keras
import numpy as np
import tensorflow as tf


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

        out = tf.numpy_function(run, [y, x], tf.float32, stateful=True)
        out.set_shape(y.shape)
        return out


def open_gated_model():
    """A built `GatedModel` (3 features in) and its gate, set: it answers until cleared."""
    gate = threading.Event()
    gate.set()
    model = GatedModel(gate)
    model(np.zeros((1, 3), np.float32))
    return model, gate
