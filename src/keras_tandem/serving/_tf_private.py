"""Every private TensorFlow call of the package, behind one checked entry point.

Why private calls at all: a serving pass over a small model costs about as
much in TensorFlow's Python call layers and thread hand-offs as in the
model. The fastest ways to call a traced function skip those layers, and
they are TensorFlow internals that any release may change. So they live
here and nowhere else, and `fast_call` uses one only after it has given the
same answers as the public `ConcreteFunction` call on the warm-up inputs.

The ways, fastest first (the `call_path` that `Predictor.stats()` reports):
- "session": the function's graph imported into a graph of its own and run
  by a `tf.compat.v1.Session` callable made once (`_make_callable_from_options`),
  on the calling thread (`RunOptions.inter_op_thread_pool = -1`), fed NumPy
  arrays that it views where they are 64-byte aligned. No eager op is built
  per call: each call skips the eager layers (op construction, kernel cache
  lookup, attribute hashing, stack capture) that cost the most CPU on cold
  caches. CPU only, and only for a function that captures nothing (a model
  with a lookup table or other resource keeps the next way).
- "call op": one `TFE_Py_Execute` of a hand-built `PartitionedCall` op that
  wraps the function. Eager mode runs a single op synchronously on the
  calling thread, and the function inside it inline: no hop to TensorFlow's
  inter-op thread pool (which training shares) and back.
- "direct": one `TFE_Py_Execute` of the function by its name (what
  `ConcreteFunction._call_flat` ends with, after about ten Python frames
  that re-read the thread's call options).
- "call flat": `ConcreteFunction._call_flat` on the flat tensors, which
  skips the public call's re-check of the nested arguments.
- "function": the public call.

Independently, the pass runs on TensorFlow's single-threaded executor
("inline": the graph's ops run on the calling thread, not each handed to the
inter-op pool) where it gives the same answers, else on the default one.

Any exception or mismatch at warm-up moves one step down. The choice is
logged once per forward pass at INFO on the `keras_tandem.serving` logger;
a fallback also warns (`RuntimeWarning`) once per process for each set of
reasons. Each private name is read in one small function below, so that a
test can break each alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from keras_tandem.serving._forward import warn_once

log = logging.getLogger("keras_tandem.serving")

CALL_PATHS = ("session", "call op", "direct", "call flat", "function")
_INLINE_EXECUTOR = "SINGLE_THREADED_EXECUTOR"
_PARTITIONED_CALL = "PartitionedCall"


Caller = Callable[[list[Any]], list[Any]]


# ------------------------------------------------------- the private names


def _tfe_py_execute() -> Callable[..., Any]:
    from tensorflow.python import pywrap_tfe

    return pywrap_tfe.TFE_Py_Execute


def _call_flat(fn: Any) -> Callable[[list[Any], list[Any]], Any]:
    return fn._call_flat


def _inference_function(fn: Any) -> Any:
    return fn._inference_function


def _eager_context(executor_type: str) -> tuple[Any, str, dict[str, Any]]:
    """The eager context's C handle, device and this thread's function call attributes."""
    from tensorflow.python.eager import context

    ctx = context.context()
    ctx.ensure_initialized()
    options = dict(ctx.function_call_options.as_attrs(), executor_type=executor_type)
    return ctx._handle, ctx.device_name, options


def _make_callable(session: Any, options: Any) -> Callable[..., list[np.ndarray]]:
    """A callable that runs `session` with `options` (a `CallableOptions`), fed positionally."""
    return session._make_callable_from_options(options)


def _status_errors() -> tuple[type[BaseException], Callable[[BaseException], BaseException]]:
    """The exception `TFE_Py_Execute` raises, and its translation to a `tf.errors` one."""
    from tensorflow.python.eager import core

    return core._NotOkStatusException, core._status_to_exception


def executor_scope(executor: str) -> contextlib.AbstractContextManager:
    """The scope that runs functions on `executor` ("inline" or "default").

    TensorFlow keeps this per thread: it affects only the thread that enters it.
    """
    if executor != "inline":
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.experimental.function_executor_type(_INLINE_EXECUTOR)


# ------------------------------------------------------------ the callers


def _public_caller(fn: Any) -> Caller:
    import tensorflow as tf

    spec = fn.structured_input_signature[0]
    flatten, pack = tf.nest.flatten, tf.nest.pack_sequence_as

    def call(args):
        return flatten(fn(*pack(spec, args)))

    return call


def _call_flat_caller(fn: Any) -> Caller:
    import tensorflow as tf

    call_flat = _call_flat(fn)
    captured = list(fn.captured_inputs)
    flatten, tensor = tf.nest.flatten, tf.Tensor

    def call(args):
        out = call_flat(args, captured)  # packed in the outputs' structure
        return [out] if isinstance(out, tensor) else flatten(out)

    return call


def _execute_caller(fn: Any, executor: str, via_call_op: bool) -> Caller:
    """One `TFE_Py_Execute` per call, with the attributes fixed now (on the worker thread)."""
    atomic = _inference_function(fn)
    handle, device, options = _eager_context(_INLINE_EXECUTOR if executor == "inline" else "")
    name = atomic.name.decode() if isinstance(atomic.name, bytes) else str(atomic.name)
    outputs = len(atomic.function_type.flat_outputs)
    captured = list(fn.captured_inputs)
    if via_call_op:
        signature = atomic.definition.signature
        op = _PARTITIONED_CALL
        attrs = {"Tin": [int(a.type) for a in signature.input_arg],
                 "Tout": [int(a.type) for a in signature.output_arg],
                 "f": name, "config": "", **options}
    else:
        op, attrs = name, options
    flat_attrs = tuple(itertools.chain(*attrs.items()))
    execute = _tfe_py_execute()
    not_ok, to_exception = _status_errors()

    def call(args):
        try:
            return execute(handle, device, op, args + captured if captured else args,
                           flat_attrs, outputs)
        except not_ok as e:
            raise to_exception(e) from None

    return call


class NotForThisGraph(Exception):
    """A way that cannot run this function by its nature (not a change in TensorFlow)."""


def _session_caller(fn: Any) -> Caller:
    """One run of a `Session` callable over the function's graph, on the calling thread.

    Its callers take NumPy arrays (`CallPlan.feeds_numpy`) and return NumPy arrays.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2

    if list(fn.captured_inputs):
        raise NotForThisGraph(
            "the function captures state (e.g. a lookup table), which a session cannot be fed")
    if tf.config.list_logical_devices("GPU"):
        raise NotForThisGraph("a GPU is visible: the session way runs on the CPU only")
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(fn.graph.as_graph_def(), name="")
    session = tf.compat.v1.Session(graph=graph)
    options = config_pb2.CallableOptions(feed=[t.name for t in fn.inputs],
                                         fetch=[t.name for t in fn.outputs])
    options.run_options.inter_op_thread_pool = -1  # the calling thread runs the graph
    run = _make_callable(session, options)

    def call(args):
        return run(*args)

    # Closed when the caller goes, or at exit while TensorFlow's modules still
    # stand (the callable's own finalizer needs them).
    weakref.finalize(call, session.close)
    return call


_BUILDERS: dict[str, Callable[[Any, str], Caller]] = {
    "session": lambda fn, executor: _session_caller(fn),
    "call op": lambda fn, executor: _execute_caller(fn, executor, via_call_op=True),
    "direct": lambda fn, executor: _execute_caller(fn, executor, via_call_op=False),
    "call flat": lambda fn, executor: _call_flat_caller(fn),
}


# ------------------------------------------------------------ the entry point


@dataclass(frozen=True)
class CallPlan:
    """How the forward pass reaches TensorFlow, as `fast_call` chose it.

    Args:
        callers: per bucket, a function from the flat tensors (in traced
            order, captured inputs excluded) to the flat output tensors.
        path: one of `CALL_PATHS`.
        executor: "inline" or "default"; run the callers in `executor_scope(executor)`.
        refused: why each faster way was refused, `(way, reason)` in the order tried.
        functions: the concrete functions called. Held here because the
            direct callers name them in TensorFlow's context, which forgets
            a function once its Python object is gone.
        feeds_numpy: the callers take NumPy arrays (aligned ones are viewed,
            not copied) and return NumPy arrays, not tensors ("session").
    """

    callers: dict[int, Caller]
    path: str
    executor: str
    refused: tuple[tuple[str, str], ...] = ()
    functions: Mapping[int, Any] | None = None
    feeds_numpy: bool = False


def fast_call(fns: Mapping[int, Any], args: Mapping[int, list[Any]], *,
              inline_executor: bool = True, call_op: bool = True,
              session: bool = True) -> CallPlan:
    """Builds the fastest caller of each bucket's concrete function that gives the right answers.

    Runs every bucket through the public call first, as the reference (and
    the first warm-up run); each faster way must then match it on every
    bucket. Call on the thread that will make the calls: the call
    attributes are that thread's.

    Args:
        fns: per bucket, the `ConcreteFunction` that runs it.
        args: per bucket, the flat tensors to check with (traced order).
            Inputs whose rows differ make a mix-up show.
        inline_executor: try TensorFlow's single-threaded executor.
        call_op: try the "call op" way (pointless for an XLA-compiled
            function, which runs on the calling thread already).
        session: try the "session" way (its callers take NumPy arrays).

    Returns:
        The `CallPlan`.

    Raises:
        Exception: whatever the public call raises (the model cannot run).
    """
    public = {b: _public_caller(f) for b, f in fns.items()}
    expected = {b: _numpy(public[b](args[b])) for b in fns}
    refused: list[tuple[str, str]] = []
    executor = "default"
    if inline_executor:
        # Compared with a tolerance: another executor may order a kernel's
        # work differently.
        outputs, reason = _run(public, args, "inline", expected, strict=False)
        if reason is None:
            executor, expected = "inline", outputs
        else:
            refused.append(("inline executor", reason))
    callers: dict[int, Caller] = public
    path = "function"
    for way in CALL_PATHS[:-1]:
        if (way == "call op" and not call_op) or (way == "session" and not session):
            continue
        try:
            candidate = _build(way, fns, executor)
        except Exception as e:  # noqa: BLE001 - a private name moved: try the next way
            refused.append((way, _describe(e)))
            continue
        way_args = _as_numpy(args) if way == "session" else args
        _, reason = _run(candidate, way_args, executor, expected, strict=True)
        if reason is None:
            callers, path = candidate, way
            break
        refused.append((way, reason))
    plan = CallPlan(callers, path, executor, tuple(refused), dict(fns),
                    feeds_numpy=path == "session")
    _report(plan)
    return plan


def _build(way: str, fns: Mapping[int, Any], executor: str) -> dict[int, Caller]:
    """Per bucket, the way's caller: one per function (buckets may share one)."""
    built: dict[int, Caller] = {}
    for f in fns.values():
        if id(f) not in built:
            built[id(f)] = _BUILDERS[way](f, executor)
    return {b: built[id(f)] for b, f in fns.items()}


def _numpy(tensors: Sequence[Any]) -> list[np.ndarray]:
    return [np.asarray(t) for t in tensors]


def _as_numpy(args: Mapping[int, list[Any]]) -> dict[int, list[np.ndarray]]:
    return {b: _numpy(a) for b, a in args.items()}


def _run(callers: Mapping[int, Caller], args: Mapping[int, list[Any]], executor: str,
         expected: Mapping[int, list[np.ndarray]], strict: bool
         ) -> tuple[dict[int, list[np.ndarray]], str | None]:
    """Runs every bucket's caller: its outputs, and None if they are as expected, else why not."""
    outputs = {}
    try:
        with executor_scope(executor):
            for b, call in callers.items():
                outputs[b] = got = _numpy(call(args[b]))
                reason = _mismatch(got, expected[b], strict)
                if reason is not None:
                    return outputs, f"{reason} at batch size {b}"
    except Exception as e:  # noqa: BLE001 - refused or moved: the caller tries the next way
        return outputs, _describe(e)
    return outputs, None


def _mismatch(got: list[np.ndarray], expected: list[np.ndarray], strict: bool) -> str | None:
    if len(got) != len(expected):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"output {i} is {g.dtype}{list(g.shape)} instead of {e.dtype}{list(e.shape)}"
        if e.dtype.kind not in "fc":
            same = np.array_equal(g, e)
        elif strict:
            # The same graph, called another way, may still round a kernel
            # differently (TensorFlow optimizes a function called through
            # PartitionedCall on its own): a few units in the last place of
            # the output's scale. A mix-up of rows or inputs is far larger.
            finite = np.abs(e[np.isfinite(e)])
            scale = float(finite.max()) if finite.size else 0.0
            same = np.allclose(g, e, rtol=0.0, atol=8 * float(np.finfo(e.dtype).eps) * scale,
                               equal_nan=True)
        else:
            same = np.allclose(g, e, rtol=1e-5, atol=1e-6, equal_nan=True)
        if not same:
            return f"output {i} differs from the public call's"
    return None


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _expected_refusal(way: str, reason: str) -> bool:
    """Whether a refusal comes from the model's graph, not from a change in TensorFlow.

    The inline executor refuses graphs with old-style control flow (`Switch`
    ops, e.g. from `tf.debugging.assert_*`; `Enter`, from a recurrent
    layer's loop), and the session way functions
    that capture state or a machine with a GPU: that is the model's or the
    machine's shape, said once at INFO, not a warning that the private API
    moved.
    """
    old_control_flow = ("does not support switch op", "does not support low level control flow")
    return ((way == "inline executor" and any(m in reason.lower() for m in old_control_flow))
            or (way == "session" and reason.startswith(NotForThisGraph.__name__)))


def _report(plan: CallPlan) -> None:
    executor = "TensorFlow's inline executor" if plan.executor == "inline" \
        else "TensorFlow's default executor"
    why = "; ".join(f"{way}: {reason}" for way, reason in plan.refused)
    log.info("The forward pass calls TensorFlow through '%s', on %s%s.", plan.path, executor,
             f" (refused: {why})" if why else "")
    if not plan.refused or all(_expected_refusal(way, reason) for way, reason in plan.refused):
        return
    # Once per process for each set of reasons: every Predictor of the
    # process would say the same.
    warn_once(
        ("call path", *(f"{way}: {reason.split(':')[0]}" for way, reason in plan.refused)),
        f"keras_tandem: the Predictor's forward pass falls back to '{plan.path}' on {executor}, "
        f"which costs more CPU per call than the fastest way; its answers are right either way. "
        f"Refused: {why}. (The inline executor refuses graphs with old-style control flow; "
        "other refusals mean that TensorFlow changed the private API the fast ways use.)")
