"""The models the benchmarks run: built the same way in every process."""

from __future__ import annotations

from typing import Any


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and the Keras backend, as `keras.utils.set_random_seed` does.

    `keras.utils.set_random_seed` also seeds TensorFlow whenever it is
    installed, which imports it: on JAX or PyTorch this seeds the rest only.
    Call it before anything draws Keras' global seed (a fresh process).

    Args:
        seed: the seed.
    """
    import random

    import keras
    import numpy as np

    backend = keras.backend.backend()
    if backend == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)  # Keras' global seed generator starts from Python's
    np.random.seed(seed)
    if backend == "torch":
        import torch

        torch.manual_seed(seed)


def build_model(name: str, seed: int = 0) -> Any:
    """Returns the benchmark model `name`: `mlp`, `cnn`, or a `.keras` file path.

    Args:
        name: `mlp` (784-256-256-10), `cnn` (32x32x3, two conv layers, dense
            head), or the path of a saved `.keras` model.
        seed: weight initialisation seed, so every process builds the same model.

    Returns:
        A built Keras model.
    """
    import keras

    if name.endswith(".keras"):
        return keras.saving.load_model(name, safe_mode=True)
    set_seed(seed)
    layers = keras.layers
    if name == "mlp":
        return keras.Sequential([
            keras.Input((784,)),
            layers.Dense(256, activation="relu"),
            layers.Dense(256, activation="relu"),
            layers.Dense(10),
        ], name="mlp")
    if name == "cnn":
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10),
        ], name="cnn")
    raise ValueError(f"Unknown model {name!r}: use 'mlp', 'cnn' or a path to a .keras file.")


def example_shape(model: Any) -> tuple[int, ...]:
    """The per-example input shape of a single-input model."""
    return tuple(model.inputs[0].shape[1:])
