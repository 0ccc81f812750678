"""Serving: predictions from any number of threads, batched.

Owns the `Predictor` (`predictor.py`), the request queue and its batching
rules (`_batching.py`), the hand-off of answers to asyncio event loops, one
wake-up per batch per loop (`_loop_bridge.py`), the model's input signature and request validation
(`_signature.py`), the counters behind `Predictor.stats()` (`_stats.py`) and
the forward pass (`_forward.py`: the backend-neutral interface the worker
uses; `_forward_tf.py`, `_forward_jax.py`, `_forward_torch.py`: each
backend's fast pass; `_forward_keras.py`: the fallback for any backend;
`_tf_private.py`: every private TensorFlow call, checked at warm-up). `specs.py` names what other
packages may use (`ArraySpec`, `castable`, `pack_inputs`, `bucket_sizes`).

Must not import: `training`, `data`, `cluster`, `server`, `bench`. Only the
`_forward_*` modules and `_tf_private.py` may import a backend (TensorFlow,
JAX or PyTorch: each pass its own, when `make_forward` chooses it), and only
on the worker thread's behalf: the rest of this package is pure
Python and NumPy.
"""

from keras_tandem.serving.predictor import Predictor

__all__ = ["Predictor"]
