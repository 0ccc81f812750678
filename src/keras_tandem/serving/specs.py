"""What the serving package shares with the rest of keras_tandem (the server, benchmarks).

Separation of concerns: the definitions live beside the code that relies on
them (`ArraySpec`, `castable` and `pack_inputs` with request validation in `_signature.py`,
`bucket_sizes` with the forward pass in `_forward.py`, `QUEUE_WAIT_BOUNDS` with the
stats in `_stats.py`); this module only
names them for other packages, so that a rule changes in one place and
nothing outside `serving` imports its private modules. No TensorFlow.
"""

from keras_tandem.serving._forward import bucket_sizes
from keras_tandem.serving._signature import ArraySpec, castable, pack_inputs
from keras_tandem.serving._stats import QUEUE_WAIT_BOUNDS

__all__ = ["QUEUE_WAIT_BOUNDS", "ArraySpec", "bucket_sizes", "castable", "pack_inputs"]
