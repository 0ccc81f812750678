"""`Predictor`: predictions from any number of threads, batched.

Separation of concerns:
- `Predictor` (this module) is the public face: it checks each request in the
  caller's thread, queues it, waits for the answer with a deadline, and owns
  the worker thread and its lifecycle (`close`, context manager).
- `_batching.BatchQueue` holds queued requests and hands the worker batches.
- `_forward.ForwardPass` is the forward pass as the worker uses it, whatever
  the backend (`_forward_choice.make_forward` picks it; `_forward_tf`,
  `_forward_jax` and `_forward_torch` are the backends' fast passes): the
  traced model, the serving copy of the weights (one version per batch), the
  batch buffers and buckets.
- `_signature.InputSignature` knows the model's inputs and validates requests;
  `_signature.ArraySpec` describes one input or output (`inputs`, `outputs`).
- `_stats.ServingStats` counts what `stats()` reports.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
import weakref
from _thread import allocate_lock
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from keras_tandem.errors import PredictionFailed, PredictorClosed
from keras_tandem.serving._batching import BatchQueue, Request, call_back
from keras_tandem.serving._forward import ForwardPass
from keras_tandem.serving._forward_choice import make_forward
from keras_tandem.serving._loop_bridge import bridge_for, post_answers
from keras_tandem.serving._signature import ArraySpec, InputSignature
from keras_tandem.serving._stats import ServingStats

_now = time.perf_counter
_LIVE: weakref.WeakSet[Predictor] = weakref.WeakSet()
_BUILD_TIMEOUT_S = 600.0


@atexit.register
def _close_all_at_exit() -> None:
    # No worker thread may outlive the interpreter's teardown of TensorFlow.
    for p in list(_LIVE):
        p.close(timeout_s=5.0)


class Predictor:
    """Serves a Keras model's predictions to any number of threads, in batches.

    Requests from all callers are coalesced into batches of at most
    `max_batch_size` rows and run through one compiled forward pass on a
    thread the Predictor owns. Every answer is computed with exactly one
    weight version, which `predict(..., return_version=True)` reports.

    Args:
        model: a built Keras model (functional, Sequential or subclassed).
            The Predictor takes its own copy of the weights: training the
            model afterwards changes no answer until `update_weights`.
        max_batch_size: most rows in one forward pass; larger requests are
            split transparently.
        max_delay_ms: under load, how long a request may wait for others
            to share its forward pass: when the last batch held several
            requests, or when a steady stream from several threads arrives
            more slowly than a pass runs. A lone request on an idle
            Predictor runs at once. Raise it (e.g. to 5) to spend less CPU
            per request under an open-loop load, such as while training.
        queue_size: most requests that may wait; beyond it `Overloaded` is
            raised at once.
        timeout_s: how long a caller waits for an answer (and
            `update_weights` for its swap) before `TimeoutError`.
        jit_compile: compile the forward pass with XLA (off by default: XLA
            drops runtime assertions, and its fixed shapes cost padding).
            TensorFlow only: on JAX the pass is always `jax.jit`-compiled,
            once per bucket; on PyTorch it is recorded per bucket.
        input_signature: `keras.Input` tensor(s) or `tf.TensorSpec`(s) with
            the batch dimension; needed only for a subclassed model that
            was never called, which the Predictor then builds by calling it
            once on a row of zeros (empty strings for string inputs).

    String inputs (`TextVectorization`, `StringLookup`, ...) take `str` or
    `bytes`, lists of them, or NumPy `str_`, `bytes_` and object arrays;
    `inputs` and `outputs` list strings with dtype `object` (answers hold
    `bytes`). A model the traced forward pass cannot run is served from a
    copy of the model (see `stats()["call_path"]`), with a warning.

    Example:

    ```python
    with Predictor(model, max_batch_size=256) as p:
        y = p.predict(x)                        # from any thread
        y, version = p.predict(x, return_version=True)
    ```
    """

    def __init__(
        self,
        model: Any,
        max_batch_size: int = 256,
        max_delay_ms: float = 0.5,
        queue_size: int = 4096,
        timeout_s: float = 30.0,
        *,
        jit_compile: bool = False,
        input_signature: Any = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}.")
        if timeout_s is None or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}.")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}.")
        self.max_batch_size = int(max_batch_size)
        self.timeout_s = float(timeout_s)
        self._signature = InputSignature.from_model(model, input_signature)
        # Requests of the model's own dtype skip parsing; strings are always
        # checked one by one (an object array may hold anything).
        first = self._signature.fields[0]
        self._fast_field = first if len(self._signature.fields) == 1 \
            and self._signature.structure == "single" and not first.is_string else None
        self._queue = BatchQueue(queue_size, self.max_batch_size, max_delay_ms / 1e3)
        self._stats = ServingStats()
        self._version = 0
        self._swaps: list[tuple[list[np.ndarray], Future]] = []
        self._swap_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._closed = False
        self._forward: ForwardPass | None = None
        started: Future = Future()
        self._worker = threading.Thread(
            target=self._serve, args=(model, jit_compile, started),
            name="keras-tandem-predictor", daemon=True,
        )
        self._worker.start()
        try:
            started.result(_BUILD_TIMEOUT_S)  # tracing errors surface here, in the constructor
        except TimeoutError:
            self.close(timeout_s=0)
            raise TimeoutError(
                f"Tracing and warming up the model took over {_BUILD_TIMEOUT_S} s; "
                "is its forward pass stuck?"
            ) from None
        _LIVE.add(self)

    # ----------------------------------------------------------------- callers

    @property
    def version(self) -> int:
        """The weight version now served: 0 at start, +1 per `update_weights`."""
        return self._version

    @property
    def inputs(self) -> tuple[ArraySpec, ...]:
        """The model's inputs, in its order: `name`, per-example `shape`, NumPy `dtype` each.

        A request gives one array per input (or a dict keyed by `name`), of
        `shape` for one example or `(n, *shape)` for a batch.
        """
        return self._signature.fields

    @property
    def outputs(self) -> tuple[ArraySpec, ...]:
        """The model's outputs, in the order it returns them: `name`, per-example `shape`, `dtype`.

        Names are a dict output's keys; for one output or a list, the model's
        output names where it has them, else `output_0`, `output_1`, ...
        """
        return self._forward.output_specs

    def predict(self, x: Any, *, return_version: bool = False) -> Any:
        """Predicts for one example or a batch; blocks until the answer is ready.

        Args:
            x: one example (the model's input shape without the batch axis)
                or a batch (leading axis n >= 1): a NumPy array or nested
                lists; a list or dict of those for a multi-input model.
            return_version: also return the weight version that answered.

        Returns:
            The outputs, in the structure the model returns, without the
            batch axis for one example; `(outputs, version)` with
            `return_version=True`.

        Raises:
            InvalidInputError: `x` does not fit the model (this request only).
            Overloaded: the queue is full.
            PredictorClosed: the Predictor was closed.
            TimeoutError: no answer within `timeout_s`.
            PredictionFailed: the forward pass failed on this request's batch.
        """
        arrays, rows, single = self._parse(x)
        deadline = _now() + self.timeout_s
        if rows > self.max_batch_size:
            futures = self._put_chunks(arrays, rows, deadline)
            result, version = self._gather(futures, deadline)
        else:
            waiter = allocate_lock()
            waiter.acquire()
            request = Request(_as_bytes(arrays), rows, single, waiter, None, deadline)
            self._queue.put(request)
            if not waiter.acquire(True, self.timeout_s):
                request.abandoned = True
                raise self._timeout_error()
            if request.error is not None:
                raise request.error
            result, version = request.result, request.version
        return (result, version) if return_version else result

    def submit(self, x: Any, *, return_version: bool = False,
               callback: Callable[[Any, BaseException | None], None] | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Any:
        """Queues a prediction and returns at once.

        Args:
            x: as for `predict`.
            return_version: the answer is then `(outputs, version)`.
            callback: instead of a future, `callback(result, error)` is
                called once with the answer and `None`, or `None` and the
                error (`TimeoutError` when the deadline passed before the
                request's batch started, `PredictionFailed`). It runs on the
                Predictor's worker thread (for a request split into several
                batches, on whichever thread finished the last one): it must
                be cheap and must never block; hand the answer on rather
                than work in it. What it raises is logged and ignored.
                Nothing calls it while the worker is stuck in a forward
                pass: keep your own deadline. No `Future` is made.
            loop: instead of a `concurrent.futures.Future`, return a future
                of this asyncio event loop, which must be the running loop
                of the calling thread. The worker resolves the futures of
                one loop with one wake-up per batch; the future fails with
                `TimeoutError` after `timeout_s`, and cancelling it drops
                the request. `apredict` is this, awaited.

        Returns:
            A `concurrent.futures.Future` of what `predict` returns; None
            with `callback`; an `asyncio.Future` with `loop`. Input errors,
            `Overloaded` and `PredictorClosed` are raised here, not through
            the future or the callback.
        """
        if callback is not None and loop is not None:
            raise ValueError("submit() takes a callback or a loop, not both.")
        arrays, rows, single = self._parse(x)
        deadline = _now() + self.timeout_s
        if rows > self.max_batch_size:
            return self._submit_chunks(arrays, rows, deadline, return_version, callback, loop)
        if loop is not None:
            answer = loop.create_future()
            bridge = bridge_for(loop)
            self._queue.put(Request(_as_bytes(arrays), rows, single, None, None, deadline,
                                    with_version=return_version, loop_future=answer,
                                    bridge=bridge), notify=False)
            bridge.notify_later(self._queue)  # one wake-up of the worker per loop pass
            bridge.watch(answer, self.timeout_s, self._expire)
            return answer
        if callback is not None:
            self._queue.put(Request(_as_bytes(arrays), rows, single, None, None, deadline,
                                    with_version=return_version, callback=callback))
            return None
        future: Future = Future()
        self._queue.put(Request(_as_bytes(arrays), rows, single, None, future, deadline,
                                with_version=return_version))
        return future

    def _submit_chunks(self, arrays, rows: int, deadline: float, return_version: bool,
                       callback, loop) -> Any:
        """`submit` for a request larger than `max_batch_size`: chunks queued together."""
        chunks = self._put_chunks(arrays, rows, deadline)
        future = Future() if callback is None else None
        remaining = [len(chunks)]
        lock = threading.Lock()

        def chunk_done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                result, version = self._gather(chunks, deadline)
                answer = (result, version) if return_version else result
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                answer, error = None, e
            else:
                error = None
            if callback is not None:
                call_back(callback, answer, error)
            elif future.cancelled():
                return
            elif error is None:
                future.set_result(answer)
            else:
                future.set_exception(error)

        for c in chunks:
            c.add_done_callback(chunk_done)
        if loop is None:
            return future
        # Rare (one request over max_batch_size rows): one wake-up of its own.
        answer = loop.create_future()
        timer = loop.call_later(self.timeout_s, self._expire, answer)

        def resolve(_):
            timer.cancel()
            if answer.done():
                return
            if future.exception() is not None:
                answer.set_exception(future.exception())
            else:
                answer.set_result(future.result())

        def cancel_chunks(_):
            if answer.cancelled():
                future.cancel()

        answer.add_done_callback(cancel_chunks)
        future.add_done_callback(
            lambda f: None if f.cancelled() else _call_soon_threadsafe(loop, resolve, f))
        return answer

    async def apredict(self, x: Any, *, return_version: bool = False) -> Any:
        """`predict` for asyncio: awaits the answer without blocking the event loop.

        Requests from one event loop share one hand-off: the worker wakes
        the loop once per batch and resolves all of that batch's answers
        for the loop at once (`submit(x, loop=...)`). Cancelling the
        awaiting task drops the request (skipped if its batch has not
        started).

        Args:
            x: as for `predict`.
            return_version: also return the weight version that answered.

        Returns:
            As `predict`.

        Raises:
            As `predict`: input errors, `Overloaded` and `PredictorClosed`
            at once, `TimeoutError` after `timeout_s`.
        """
        return await self.submit(x, return_version=return_version,
                                 loop=asyncio.get_running_loop())

    def _expire(self, answer: asyncio.Future) -> None:
        # On the caller's loop, timeout_s after a loop request was queued.
        if not answer.done():
            answer.set_exception(self._timeout_error())

    def update_weights(self, source: Any) -> int:
        """Swaps in new weights between two batches and returns their version.

        The weights are read in the caller's thread (so a training thread
        that calls this between steps hands over a consistent snapshot) and
        copied: later changes to `source` do not affect answers.

        Args:
            source: a Keras model of the same architecture, or a list of
                arrays like `model.get_weights()`.

        Returns:
            The new version number; every answer computed from now on
            reports it (or a later one).

        Raises:
            ValueError: the weights do not fit the served model.
            PredictorClosed: the Predictor was closed.
            TimeoutError: the worker did not swap within `timeout_s`.
        """
        arrays = source.get_weights() if hasattr(source, "get_weights") else source
        checked = self._forward.check_weights(arrays)
        done: Future = Future()
        with self._swap_lock:
            if self._closed:
                raise PredictorClosed("The Predictor is closed: it takes no new weights.")
            self._swaps.append((checked, done))
        self._queue.wake()
        try:
            return done.result(self.timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"update_weights: the worker did not swap the weights in within "
                f"timeout_s={self.timeout_s} s (is a forward pass stuck?)."
            ) from None

    def stats(self) -> dict[str, Any]:
        """Counters since start.

        Returns:
            A dict with `requests` (answered), `batches`, `mean_batch_size`
            (rows per batch), `p50_latency_ms` and `p99_latency_ms` (queueing
            and forward pass, over recent requests), `queue_depth`,
            `rejected` (`Overloaded`), `errors` (failed requests of any
            kind), `invalid_inputs`, `timeouts`, `version`, `traces`
            (forward-pass traces since start; constant after warm-up),
            `call_path` (how each pass reaches the backend, chosen at
            warm-up: on TensorFlow "session" on the CPU, else "call op",
            "direct", "call flat" or "function" when a faster way was
            refused; on JAX "jax jit", on PyTorch "torch inference_mode";
            "keras copy" when the
            traced pass cannot run the model and the Predictor's own copy of
            it runs Keras' predict step) and `executor` ("inline" or
            "default"), `queue_wait_seconds` (total time requests waited
            in the queue before their batch started) and `queue_wait_counts`
            (requests by queue wait: one count per bound of
            `serving.specs.QUEUE_WAIT_BOUNDS`, then one beyond the last),
            and `worker_cpu_s`: CPU seconds the worker thread has used
            (batching, forward passes, answering), None where the system
            does not say (Linux does).
        """
        s = self._stats.snapshot()
        s["queue_depth"] = len(self._queue)
        s["rejected"] = self._queue.rejected
        s["errors"] = self._stats.errors + self._stats.invalid + self._stats.timeouts
        s["version"] = self._version
        forward = self._forward
        s["traces"] = forward.traces if forward else 0
        s["call_path"] = forward.call_path if forward else None
        s["executor"] = forward.executor if forward else None
        s["worker_cpu_s"] = _thread_cpu_s(self._worker.native_id)
        return s

    def close(self, timeout_s: float | None = None) -> None:
        """Stops intake, answers every queued request, and joins the worker.

        Idempotent. New requests raise `PredictorClosed`; queued ones are
        still answered.

        Args:
            timeout_s: how long to wait for the queue to drain (default
                `timeout_s` of the Predictor).
        """
        with self._swap_lock:
            self._closed = True
        self._queue.close()
        if threading.current_thread() is not self._worker:
            self._worker.join(self.timeout_s if timeout_s is None else timeout_s)
        _LIVE.discard(self)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        inputs = [f.name for f in self._signature.fields]
        return (f"<Predictor {state} version={self._version} "
                f"max_batch_size={self.max_batch_size} inputs={inputs}>")

    # ------------------------------------------------------- caller-side help

    def _parse(self, x: Any) -> tuple[tuple[np.ndarray, ...], int, bool]:
        f = self._fast_field
        if (f is not None and type(x) is np.ndarray and x.dtype == f.dtype
                and x.flags.c_contiguous):
            # Fast path: the common request needs no conversion.
            if x.shape == f.shape:
                return (x[None],), 1, True
            if x.shape[1:] == f.shape and x.ndim == len(f.shape) + 1 and x.shape[0] >= 1:
                return (x,), x.shape[0], False
        try:
            arrays, rows, single = self._signature.parse(x)
        except ValueError:
            with self._count_lock:
                self._stats.invalid += 1
            raise
        if single:
            arrays = tuple(a[None] for a in arrays)
        return tuple(np.ascontiguousarray(a) for a in arrays), rows, single

    def _put_chunks(self, arrays, rows: int, deadline: float) -> list[Future]:
        step = self.max_batch_size
        starts = range(0, rows, step)
        futures = [Future() for _ in starts]
        chunks = [
            Request(_as_bytes([a[s:s + step] for a in arrays]), min(step, rows - s), False, None,
                    f, deadline, with_version=True, more_follow=s + step < rows)
            for s, f in zip(starts, futures)
        ]
        self._queue.put_all(chunks)
        return futures

    def _gather(self, futures: list[Future], deadline: float) -> tuple[Any, int]:
        import keras

        results = []
        for f in futures:
            try:
                results.append(f.result(max(0.0, deadline - _now())))
            except TimeoutError:
                for g in futures:
                    g.cancel()
                raise self._timeout_error() from None
        version = results[0][1]
        combined = keras.tree.map_structure(lambda *parts: np.concatenate(parts),
                                            *[r for r, _ in results])
        return combined, version

    def _timeout_error(self) -> TimeoutError:
        with self._count_lock:
            self._stats.timeouts += 1
        return TimeoutError(
            f"No prediction within timeout_s={self.timeout_s} s: the request waited in a "
            f"queue of {len(self._queue)} behind a busy worker. Raise timeout_s, add capacity, "
            "or send less load."
        )

    # ------------------------------------------------------------ the worker

    def _serve(self, model: Any, jit_compile: bool, started: Future) -> None:
        try:
            self._forward = make_forward(model, self._signature, self.max_batch_size,
                                         jit_compile)
        except BaseException as e:  # noqa: BLE001 - re-raised in the constructor
            started.set_exception(e)
            return
        started.set_result(None)
        with self._forward.worker_scope():
            self._serve_batches()

    def _serve_batches(self) -> None:
        """The worker's loop: apply weight swaps, take a batch, run it, until closed."""
        expect_rows = 0
        swap_blocked = False
        while True:
            if self._swaps and not swap_blocked:
                self._apply_swaps()
            batch = self._queue.take(expect_rows)
            if batch is None:
                break
            if not batch:
                continue
            swap_blocked = batch[-1].more_follow
            expect_rows = sum(r.rows for r in batch) if len(batch) > 1 else 0
            started = _now()
            try:
                self._run_batch(batch)
            except BaseException as e:  # noqa: BLE001 - a bug here must not strand callers
                for r in batch:
                    r.fail(e)
                on_loops = [r for r in batch if r.bridge is not None]
                if on_loops:
                    post_answers(on_loops)
            self._queue.note_pass(_now() - started)
        self._apply_swaps()
        with self._swap_lock:
            for _, done in self._swaps:
                done.set_exception(PredictorClosed("The Predictor closed before the swap."))
            self._swaps.clear()

    def _apply_swaps(self) -> None:
        with self._swap_lock:
            swaps, self._swaps = self._swaps, []
        if not swaps:
            return
        try:
            self._forward.set_weights(swaps[-1][0])  # only the newest is ever served
        except BaseException as e:  # noqa: BLE001 - handed to update_weights' callers
            for _, done in swaps:
                done.set_exception(e)
            return
        for _, done in swaps:
            self._version += 1
            done.set_result(self._version)

    def _run_batch(self, batch: list[Request]) -> None:
        now = _now()
        live = []
        on_loops = None  # apredict requests: answered through their loops' bridges
        for r in batch:
            if r.waiter is not None:  # predict: the hot path, one test
                if not r.abandoned:
                    live.append(r)
                continue
            if r.bridge is not None:
                if r.loop_future.done():  # cancelled, or timed out on its loop
                    continue
                if on_loops is None:
                    on_loops = []
                on_loops.append(r)
                if r.deadline < now:
                    r.fail(self._timeout_error())
                else:
                    live.append(r)
            elif r.deadline < now:
                r.fail(self._timeout_error())
            elif r.future is None or r.future.set_running_or_notify_cancel():
                live.append(r)
        if live:
            self._answer(live)
        if on_loops is not None:
            post_answers(on_loops)

    def _answer(self, live: list[Request]) -> None:
        start = _now()
        forward = self._forward
        rows = 0
        for r in live:
            rows += r.rows
        bucket = forward.bucket_of[rows]
        forward.fill(live, rows, bucket)
        version = self._version
        try:
            outputs = forward.run(bucket)
        except Exception as e:  # noqa: BLE001 - fails this batch only
            message = (f"The model's forward pass failed on a batch of {len(live)} "
                       f"request(s), {rows} row(s), weight version {version}: "
                       f"{type(e).__name__}: {e}")
            self._stats.errors += len(live)
            for r in live:  # one exception object per caller: each raises its own
                error = PredictionFailed(message)
                error.__cause__ = e
                r.fail(error)
            return
        # Counted before any caller is answered, so that stats() (and the
        # server's metrics) already include every answer a caller has seen.
        self._stats.record_batch(len(live), rows, _now(), start, [r.enqueued for r in live])
        pos = 0
        if forward.single_output:
            out = outputs[0]
            for r in live:
                n = r.rows
                result = out[pos] if r.single else out[pos:pos + n]
                pos += n
                if r.waiter is not None:  # Request.finish, inlined: the hottest loop
                    r.result = result
                    r.version = version
                    r.waiter.release()
                else:
                    r.finish(result, version)
        else:
            pack = forward.pack_outputs
            for r in live:
                n = r.rows
                r.finish(pack([o[pos] if r.single else o[pos:pos + n] for o in outputs]),
                         version)
                pos += n


def _thread_cpu_s(native_id: int | None) -> float | None:
    """CPU seconds a live thread of this process has used, from Linux's /proc; else None."""
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9  # on-CPU time, nanoseconds
    except (OSError, ValueError, IndexError):  # not Linux, or the thread has ended
        return None


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable, arg: Any) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(fn, arg)


def _as_bytes(arrays) -> tuple[Any, ...]:
    """Flat byte views of C-contiguous arrays: the worker copies them with a memcpy.

    String (object) arrays hold references, not bytes: they stay arrays, which
    the worker copies with NumPy.
    """
    views = []
    for a in arrays:
        if a.dtype.kind == "O":
            views.append(a)
            continue
        try:
            views.append(memoryview(a).cast("B"))
        except (TypeError, ValueError):  # dtypes the buffer protocol cannot name
            views.append(memoryview(a.reshape(-1).view(np.uint8)))
    return tuple(views)
