"""The errors keras-tandem raises to its callers.

The `Predictor`'s errors tell a caller what happened to *its own* request and
what to do; none of them means the Predictor stopped serving other callers.
`WorkerLost` ends a multi-worker training run. Pure Python, so that
`import keras_tandem` can export them all without loading TensorFlow.
"""

from __future__ import annotations


class InvalidInputError(ValueError):
    """A request's input does not match the model's inputs.

    Raised in the caller's thread before the request joins a batch, so no
    other request is affected. The message names the input, the expected
    per-example shape and dtype, and what was given.
    """


class Overloaded(RuntimeError):
    """The Predictor's request queue is full; the request was not accepted.

    Raised at once (never a silent drop). Retry later, or give the Predictor
    a larger `queue_size`.
    """


class PredictorClosed(RuntimeError):
    """The Predictor was closed: it accepts no new requests."""


class PredictionFailed(RuntimeError):
    """The model's forward pass raised on the batch this request was part of.

    The original exception is chained as `__cause__`. Only the requests of
    that one batch fail; the Predictor keeps serving.
    """


class WorkerLost(RuntimeError):
    """A peer of a multi-worker cluster died or stopped answering.

    Raised by `TrainingRun.join()` on every surviving worker (the TensorFlow
    error is chained as `__cause__`); the message says from which epoch
    training resumes. The collectives of this process are aborted, so it
    cannot go on training: end it and start every worker again (with a
    `checkpoint_dir`, training resumes from the last epoch saved).
    """
