"""The models the benchmarks run: built the same way in every process."""

from __future__ import annotations

from typing import Any


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
    keras.utils.set_random_seed(seed)
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
