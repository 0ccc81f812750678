"""keras-tandem: train a Keras model and predict with it from many threads at once.

`PublishWeights`, `train_in_background`, `make_pipeline`, `probe_input` and
`choose_strategy` import Keras and TensorFlow, so they load on first use:
`import keras_tandem` (and `tandem --help`) stay fast. `cluster_position`
(this process's place in a `TF_CONFIG` cluster) loads on first use too.
"""

from typing import TYPE_CHECKING, Any

from keras_tandem.errors import (
    InvalidInputError,
    Overloaded,
    PredictionFailed,
    PredictorClosed,
    WorkerLost,
)
from keras_tandem.serving.predictor import Predictor

if TYPE_CHECKING:
    from keras_tandem.cluster.strategy import choose_strategy
    from keras_tandem.cluster.tf_config import cluster_position
    from keras_tandem.data.pipeline import make_pipeline
    from keras_tandem.data.probe import probe_input
    from keras_tandem.server import serve
    from keras_tandem.training.background import TrainingProgress, TrainingRun, train_in_background
    from keras_tandem.training.publish import PublishWeights

__all__ = [
    "InvalidInputError",
    "Overloaded",
    "PredictionFailed",
    "Predictor",
    "PredictorClosed",
    "PublishWeights",
    "TrainingProgress",
    "TrainingRun",
    "WorkerLost",
    "choose_strategy",
    "cluster_position",
    "make_pipeline",
    "probe_input",
    "serve",
    "train_in_background",
]
__version__ = "0.1.0"

_LAZY = {
    "PublishWeights": "keras_tandem.training.publish",
    "TrainingProgress": "keras_tandem.training.background",
    "TrainingRun": "keras_tandem.training.background",
    "train_in_background": "keras_tandem.training.background",
    "make_pipeline": "keras_tandem.data.pipeline",
    "probe_input": "keras_tandem.data.probe",
    "choose_strategy": "keras_tandem.cluster.strategy",
    "cluster_position": "keras_tandem.cluster.tf_config",  # pure Python, no TensorFlow
    "serve": "keras_tandem.server",  # imports aiohttp
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'keras_tandem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
