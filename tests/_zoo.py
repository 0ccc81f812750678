"""A zoo of small models of the kinds Keras users commonly have, for serving tests.

`ZOO` maps a kind's name to a builder. Each builder makes a fresh, tiny,
CPU-fast model (random weights, nothing downloaded) and returns a `ZooModel`:
the model, `make_inputs(n)` giving a batch of n valid examples in the
structure the model takes (deterministic per n), and the relative tolerance
its answers must meet against `model.predict`. Custom classes are registered
as Keras serializables (package "keras_tandem_zoo"), so a saved copy loads
again in a process that imported this module.

Kinds that need more than the model to be served say so in `ZooModel`:
`input_signature` (a subclassed model never called) is what the Predictor
must be given. The builders leave Keras' global dtype policy as they found it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers, ops

_PKG = "keras_tandem_zoo"
_WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "short", "text"]


@dataclass
class ZooModel:
    """One zoo model, ready to serve.

    Args:
        model: the Keras model (built, except where `input_signature` is set).
        make_inputs: `n -> batch` of n examples, in the structure the model takes.
        rtol: relative tolerance of answers against `model.predict`.
        input_signature: what `Predictor(..., input_signature=...)` needs, or None.
    """

    model: Any
    make_inputs: Callable[[int], Any]
    rtol: float = 1e-4
    input_signature: Any = None


def _rng(n: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(1000 * n + salt)


def _floats(shape: tuple[int, ...], salt: int = 0) -> Callable[[int], np.ndarray]:
    return lambda n: _rng(n, salt).normal(size=(n, *shape)).astype("float32")


def _ints(shape: tuple[int, ...], high: int, low: int = 0) -> Callable[[int], np.ndarray]:
    return lambda n: _rng(n).integers(low, high, size=(n, *shape)).astype("int32")


def _sentences(n: int) -> np.ndarray:
    # Object arrays of str: what `model.predict` takes for a string input.
    rng = _rng(n)
    return np.array([" ".join(rng.choice(_WORDS, size=rng.integers(1, 6))) for _ in range(n)],
                    dtype=object)


# ------------------------------------------------------------- custom classes


@keras.saving.register_keras_serializable(package=_PKG)
class Scale(layers.Layer):
    """Multiplies by one trained scalar."""

    def build(self, input_shape):
        self.factor = self.add_weight(shape=(), initializer=keras.initializers.Constant(1.5))

    def call(self, x):
        return x * self.factor


@keras.saving.register_keras_serializable(package=_PKG)
class _Scale(Scale):
    """The same layer under a class name starting with an underscore (scope '__scale')."""


@keras.saving.register_keras_serializable(package=_PKG)
class CondLayer(layers.Layer):
    """`ops.cond` on a weight (a switch a user trains or sets), so rows stay independent."""

    def build(self, input_shape):
        self.switch = self.add_weight(shape=(), initializer="ones", trainable=False)

    def call(self, x):
        return ops.cond(self.switch > 0, lambda: x * 2.0, lambda: x - 1.0)


@keras.saving.register_keras_serializable(package=_PKG)
class WhereLayer(layers.Layer):
    """`ops.where` element by element."""

    def call(self, x):
        return ops.where(x > 0, x, 0.1 * x)


@keras.saving.register_keras_serializable(package=_PKG)
class TopKLayer(layers.Layer):
    """`ops.top_k`: the k largest values per row."""

    def __init__(self, k: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.k = k

    def call(self, x):
        values, _ = ops.top_k(x, k=self.k)
        return values

    def get_config(self):
        return {**super().get_config(), "k": self.k}


@keras.saving.register_keras_serializable(package=_PKG)
class TwoTower(keras.Model):
    """A subclassed model: two dense layers and a dropout that depends on `training`."""

    def __init__(self, units: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = layers.Dense(units, activation="relu")
        self.dropout = layers.Dropout(0.5)
        self.out = layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.dropout(self.hidden(x), training=training))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


# ------------------------------------------------------------------ builders


def _dense_head(x, classes: int = 4):
    return layers.Dense(classes)(layers.Dense(16, activation="relu")(x))


def mlp() -> ZooModel:
    inputs = keras.Input((20,))
    return ZooModel(keras.Model(inputs, _dense_head(inputs)), _floats((20,)))


def cnn_uint8() -> ZooModel:
    inputs = keras.Input((16, 16, 3), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    return ZooModel(keras.Model(inputs, layers.Dense(5)(x)),
                    lambda n: _rng(n).integers(0, 256, (n, 16, 16, 3)).astype("uint8"))


def batchnorm_dropout() -> ZooModel:
    inputs = keras.Input((12,))
    x = layers.Dense(16)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.5)(layers.Activation("relu")(x))
    model = keras.Model(inputs, layers.Dense(2)(x))
    bn = model.layers[2]
    bn.moving_mean.assign(np.linspace(-1, 1, 16).astype("float32"))
    bn.moving_variance.assign(np.linspace(0.5, 2, 16).astype("float32"))
    return ZooModel(model, _floats((12,)))


def _sequence_model(rnn: layers.Layer) -> ZooModel:
    inputs = keras.Input((6, 4))
    return ZooModel(keras.Model(inputs, layers.Dense(3)(rnn(inputs))), _floats((6, 4)))


def lstm() -> ZooModel:
    return _sequence_model(layers.LSTM(8))


def gru() -> ZooModel:
    return _sequence_model(layers.GRU(8))


def bidirectional() -> ZooModel:
    return _sequence_model(layers.Bidirectional(layers.LSTM(6)))


def _embedding(mask_zero: bool) -> ZooModel:
    inputs = keras.Input((7,), dtype="int32")
    x = layers.Embedding(30, 8, mask_zero=mask_zero)(inputs)
    x = layers.GRU(6)(x) if mask_zero else layers.GlobalAveragePooling1D()(x)

    def make(n):  # trailing zeros: the padding a mask hides
        ids = _rng(n).integers(1, 30, (n, 7)).astype("int32")
        ids[np.arange(7) >= 4 + (np.arange(n) % 3)[:, None]] = 0
        return ids

    return ZooModel(keras.Model(inputs, layers.Dense(3)(x)), make)


def embedding() -> ZooModel:
    return _embedding(mask_zero=False)


def embedding_mask_zero() -> ZooModel:
    return _embedding(mask_zero=True)


def text_vectorization() -> ZooModel:
    vectorize = layers.TextVectorization(max_tokens=20, output_sequence_length=6)
    vectorize.adapt(np.array([" ".join(_WORDS[i:i + 4]) for i in range(len(_WORDS))]))
    inputs = keras.Input((), dtype="string")
    x = layers.Embedding(20, 8)(vectorize(inputs))
    x = layers.GlobalAveragePooling1D()(x)
    return ZooModel(keras.Model(inputs, layers.Dense(2)(x)), _sentences)


def string_lookup() -> ZooModel:
    """One categorical word per example (`model.predict` takes 1-D object arrays only)."""
    inputs = keras.Input((), dtype="string")
    ids = layers.StringLookup(vocabulary=_WORDS[:8])(inputs)
    x = layers.Embedding(9, 4)(ids)
    return ZooModel(keras.Model(inputs, layers.Dense(2)(x)),
                    lambda n: _rng(n).choice(_WORDS, size=n).astype(object))


def string_lookup_invert() -> ZooModel:
    """String outputs: token ids back to words."""
    inputs = keras.Input((4,), dtype="int64")
    words = layers.StringLookup(vocabulary=_WORDS[:8], invert=True)(inputs)
    return ZooModel(keras.Model(inputs, words),
                    lambda n: _rng(n).integers(0, 9, (n, 4)).astype("int64"))


def multi_input() -> ZooModel:
    image = keras.Input((8, 8, 1), name="image")
    meta = keras.Input((5,), name="meta")
    x = layers.Concatenate()([layers.Flatten()(layers.Conv2D(4, 3)(image)), meta])
    model = keras.Model({"image": image, "meta": meta}, _dense_head(x))
    return ZooModel(model, lambda n: {"image": _floats((8, 8, 1), 1)(n),
                                      "meta": _floats((5,), 2)(n)})


def multi_output() -> ZooModel:
    inputs = keras.Input((10,))
    h = layers.Dense(16, activation="relu")(inputs)
    score = layers.Dense(1, activation="sigmoid", name="score")(h)
    classes = layers.Dense(4, activation="softmax", name="classes")(h)
    return ZooModel(keras.Model(inputs, [score, classes]), _floats((10,)))


def dict_outputs() -> ZooModel:
    inputs = keras.Input((10,))
    h = layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, {"mean": layers.Dense(2)(h), "logits": layers.Dense(3)(h)})
    return ZooModel(model, _floats((10,)))


def subclassed() -> ZooModel:
    model = TwoTower()
    model(np.zeros((1, 10), "float32"))
    return ZooModel(model, _floats((10,)))


def subclassed_unbuilt() -> ZooModel:
    """Never called: only `input_signature` tells its shape (and builds it)."""
    return ZooModel(TwoTower(), _floats((10,)), input_signature=keras.Input((10,)))


def custom_layer() -> ZooModel:
    inputs = keras.Input((6,))
    return ZooModel(keras.Model(inputs, layers.Dense(2)(Scale()(inputs))), _floats((6,)))


def custom_layer_underscore() -> ZooModel:
    inputs = keras.Input((6,))
    return ZooModel(keras.Model(inputs, layers.Dense(2)(_Scale()(inputs))), _floats((6,)))


def mixed_float16() -> ZooModel:
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((16,))
        x = layers.Dense(32, activation="relu")(inputs)
        outputs = layers.Dense(4, dtype="float32")(layers.Dense(8)(x))
        model = keras.Model(inputs, outputs)
    finally:
        keras.config.set_dtype_policy(before)
    return ZooModel(model, _floats((16,)), rtol=1e-2)


def normalization_resizing() -> ZooModel:
    inputs = keras.Input((12, 12, 3))
    norm = layers.Normalization(mean=[0.2, 0.4, 0.6], variance=[1.0, 2.0, 0.5])
    x = layers.Resizing(8, 8)(norm(inputs))
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(x))
    return ZooModel(keras.Model(inputs, layers.Dense(2)(x)),
                    lambda n: _rng(n).uniform(0, 1, (n, 12, 12, 3)).astype("float32"))


def mobilenet_v3_small() -> ZooModel:
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, minimalistic=True, weights=None, classes=3,
        include_preprocessing=True)
    return ZooModel(model, lambda n: _rng(n).uniform(0, 255, (n, 32, 32, 3)).astype("float32"),
                    rtol=1e-3)


def _op_model(layer: layers.Layer) -> ZooModel:
    inputs = keras.Input((8,))
    return ZooModel(keras.Model(inputs, layers.Dense(2)(layer(inputs))), _floats((8,)))


def ops_cond() -> ZooModel:
    return _op_model(CondLayer())


def ops_where() -> ZooModel:
    return _op_model(WhereLayer())


def ops_top_k() -> ZooModel:
    return _op_model(TopKLayer(3))


def conv1d() -> ZooModel:
    inputs = keras.Input((20, 3))
    x = layers.Conv1D(8, 5, activation="relu")(inputs)
    x = layers.GlobalMaxPooling1D()(layers.MaxPooling1D()(x))
    return ZooModel(keras.Model(inputs, layers.Dense(2)(x)), _floats((20, 3)))


def attention() -> ZooModel:
    inputs = keras.Input((5, 8))
    x = layers.MultiHeadAttention(num_heads=2, key_dim=4)(inputs, inputs)
    x = layers.LayerNormalization()(x + inputs)
    return ZooModel(keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling1D()(x))),
                    _floats((5, 8)))


def sequential() -> ZooModel:
    model = keras.Sequential([keras.Input((9,)), layers.Dense(8, activation="tanh"),
                              layers.Dropout(0.3), layers.Dense(1)])
    return ZooModel(model, _floats((9,)))


ZOO: dict[str, Callable[[], ZooModel]] = {f.__name__: f for f in [
    mlp, cnn_uint8, batchnorm_dropout, lstm, gru, bidirectional, embedding,
    embedding_mask_zero, text_vectorization, string_lookup, string_lookup_invert,
    multi_input, multi_output, dict_outputs, subclassed, subclassed_unbuilt, custom_layer,
    custom_layer_underscore, mixed_float16, normalization_resizing, mobilenet_v3_small,
    ops_cond, ops_where, ops_top_k, conv1d, attention, sequential,
]}
