"""The errors a `Predictor` raises to its callers.

Each one tells the caller what happened to *its own* request and what to do;
none of them means the Predictor stopped serving other callers.
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
