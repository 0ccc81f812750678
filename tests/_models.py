"""Small models that several test files share."""

import keras


def mlp(seed: int = 0) -> keras.Model:
    """An 8 -> 16 -> 4 MLP with seeded weights: cheap to build and to trace."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(4),
    ])
