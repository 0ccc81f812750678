"""Which forward pass serves a model: the fast one when its answers are right, else a copy.

`make_forward` runs once per Predictor, on its worker thread. It builds a
model that was never called (calling it once on a row of the signature),
takes the model's own eager answers on a few patterned rows, traces the
backend's fast pass (`_forward_tf.TensorFlowForward` on TensorFlow,
`_forward_jax.JaxForward` on JAX, `_forward_torch.TorchForward` on PyTorch)
and trusts it only when it runs and gives those answers. Otherwise it falls back
to `_forward_keras.KerasCopyForward`, logs a warning per Predictor and warns
once per process for each reason. The passes themselves live in their own
modules; this one only chooses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from keras_tandem.serving._forward import (
    ForwardPass,
    call_model,
    pattern,
    to_tensors,
    warn_once,
    zero_rows,
)
from keras_tandem.serving._signature import InputSignature

log = logging.getLogger("keras_tandem.serving")

_CHECK_ROWS = 3
# Building and the eager check call the user's model itself: one Predictor at
# a time, as Keras' TensorFlow backend is not thread-safe.
_MODEL_LOCK = threading.Lock()


def ensure_built(model: Any, signature: InputSignature) -> None:
    """Builds a model that was never called by calling it once on one row of the signature.

    Only calling builds every model (a subclassed `build` may not create all
    variables); the row is zeros, and empty strings for string inputs.
    """
    if getattr(model, "built", True):
        return
    try:
        call_model(model, signature.pack(to_tensors(zero_rows(signature), signature.fields)))
    except Exception as e:
        shapes = ", ".join(f"'{f.name}' {f.shape} {f.dtype}" for f in signature.fields)
        raise ValueError(
            f"{type(model).__name__} was never called, and calling it on one row of the given "
            f"input_signature ({shapes}) failed: {type(e).__name__}: {e}. Check that "
            "`input_signature` matches what the model's call() takes, or call the model once "
            "on example data before building the Predictor."
        ) from e


def _eager_answers(model: Any, signature: InputSignature,
                   rows: list[np.ndarray]) -> tuple[list[np.ndarray] | None, str]:
    """The model's own eager answers on `rows`, flat; or None and why they could not be had.

    Asked twice: a model whose answers vary from call to call (it samples
    at inference) gives nothing to compare a pass with.
    """
    import keras

    answers = []
    try:
        for _ in range(2):
            out = call_model(model, signature.pack(to_tensors(rows, signature.fields)))
            answers.append([np.asarray(keras.ops.convert_to_numpy(o))
                            for o in keras.tree.flatten(out)])
    except Exception as e:  # noqa: BLE001 - then nothing to compare against
        return None, f"the model's eager call failed: {_describe(e)}"
    if _mismatch(answers[0], answers[1]) is not None:
        return None, "the model's answers vary from call to call"
    return answers[0], ""


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or dtype.name.startswith(("bfloat", "float"))


def _mismatch(got: list[Any], expected: list[np.ndarray]) -> str | None:
    """Why `got` is not `expected` (loosely: the same model, traced or not), or None."""
    n = len(expected[0]) if expected else 0
    if len(got) != len(expected):
        return f"it returns {len(got)} outputs, the model {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        g = np.asarray(g)[:n]
        if g.shape != e.shape:
            return f"output {i} has shape {g.shape}, the model's {e.shape}"
        if _is_float(e.dtype):
            e64, g64 = e.astype(np.float64), g.astype(np.float64)
            scale = float(np.max(np.abs(e64), initial=0.0, where=np.isfinite(e64)))
            same = np.allclose(g64, e64, rtol=1e-2, atol=1e-3 * (1.0 + scale), equal_nan=True)
        else:
            same = np.array_equal(g, e)
        if not same:
            return f"output {i} differs from the model's own (eager) answer"
    return None


def _disagreement(forward: ForwardPass, rows: list[np.ndarray],
                  expected: list[np.ndarray] | None) -> str | None:
    """Runs `rows` through a warmed-up pass; why its answers are wrong, or None.

    Without the model's own answers (its eager call failed on these rows, as
    a model that asserts on its inputs may) there is nothing to check.
    """
    if expected is None:
        return None
    n = len(rows[0])
    bucket = forward.bucket_of[n]
    for buffer, r in zip(forward.buffers, rows):
        buffer[:n] = r
        buffer[n:bucket] = b"" if buffer.dtype.kind == "O" else 0
    return _mismatch(forward.run(bucket), expected)


def _fast_pass(backend: str) -> Callable[..., ForwardPass] | None:
    """The constructor of the backend's fast pass, imported only now; None if it has none."""
    if backend == "tensorflow":
        from keras_tandem.serving._forward_tf import TensorFlowForward

        return TensorFlowForward
    if backend == "jax":
        from keras_tandem.serving._forward_jax import JaxForward

        return lambda model, signature, max_rows, _jit: JaxForward(model, signature, max_rows)
    if backend == "torch":
        from keras_tandem.serving._forward_torch import TorchForward

        return lambda model, signature, max_rows, _jit: TorchForward(model, signature, max_rows)
    return None


def make_forward(model: Any, signature: InputSignature, max_rows: int,
                 jit_compile: bool = False) -> ForwardPass:
    """The forward pass for this model and Keras backend, built, traced and warmed up.

    A model that was never called is first called once on a row of the
    signature, which builds it. Then the backend's fast pass is traced; it
    is used when it runs and answers a few patterned rows as an eager call
    of the model does. Otherwise (it cannot trace or run the model, its
    answers differ, or the backend has none) the Predictor falls back to
    `KerasCopyForward`, and warns once with the reason.

    Args:
        model: a Keras model.
        signature: its `InputSignature`.
        max_rows: the largest batch (rows) the worker will run.
        jit_compile: compile with XLA (one trace per bucket; TensorFlow's fast
            pass only: JAX's always compiles, once per bucket).

    Returns:
        The `ForwardPass`; its `call_path` says which way it runs.

    Raises:
        RuntimeError: neither the fast pass nor a copy of the model could run it.
    """
    import keras

    n = min(_CHECK_ROWS, max_rows)
    rows = [pattern((n, *f.shape), f.dtype) for f in signature.fields]
    with _MODEL_LOCK:
        ensure_built(model, signature)
        expected, no_reference = _eager_answers(model, signature, rows)
    backend = keras.backend.backend()
    make_fast = _fast_pass(backend)
    if make_fast is not None:
        try:
            fast = make_fast(model, signature, max_rows, jit_compile)
            reason = _disagreement(fast, rows, expected)
        except Exception as e:  # noqa: BLE001 - the fallback is tried, the reason reported
            reason = _describe(e)
        if reason is None:
            return fast
        reason = f"the {backend} pass failed on this model ({reason})"
    else:
        reason = f"there is no fast forward pass for Keras' '{backend}' backend yet"
    from keras_tandem.serving._forward_keras import KerasCopyForward

    try:
        slow = KerasCopyForward(model, signature, max_rows,
                                accept=lambda f: _disagreement(f, rows, expected))
    except RuntimeError as e:
        raise RuntimeError(
            f"The Predictor cannot run this model: {reason}, and {e}. "
            + (f"Nothing could check the answers: {no_reference}. " if no_reference
               else "") + "Please report the model's architecture to keras-tandem."
        ) from e
    _report_fallback(slow, reason, no_reference)
    return slow


def _report_fallback(forward: ForwardPass, reason: str, no_reference: str) -> None:
    unchecked = f"; its answers were not checked: {no_reference}" if no_reference else ""
    message = (f"keras_tandem: the Predictor runs its own copy of the model with Keras' "
               f"predict step ('{forward.call_path}', copied by {forward.copied_by}), which is "
               f"slower than the traced pass, because {reason}{unchecked}.")
    log.warning(message)
    warn_once(("keras copy", reason.split("(")[0] + reason.split(":")[0]), message)
