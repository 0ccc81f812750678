"""keras-tandem: train a Keras model and predict with it from many threads at once."""

from keras_tandem.errors import InvalidInputError, Overloaded, PredictionFailed, PredictorClosed
from keras_tandem.predictor import Predictor

__all__ = [
    "InvalidInputError",
    "Overloaded",
    "PredictionFailed",
    "Predictor",
    "PredictorClosed",
]
__version__ = "0.1.0"
