"""The request queue between caller threads and the Predictor's worker.

`Request` is one caller's work item: its input rows, how it is told the
answer (a bare lock for `predict`, a `concurrent.futures.Future` or a
callback for `submit`, an asyncio future and its loop's bridge for
`apredict`), its deadline, and once done its result or error and the weight
version that produced it. `BatchQueue` is a bounded FIFO that the worker
drains in batches of at most `max_rows` rows. `Clock` is where the queue
reads the time and waits: the real one is `time.perf_counter` and
`Condition.wait` themselves, and tests pass a fake one to run the wait rules
in virtual time. Pure Python: no TensorFlow here, so the hot path of every
request is a handful of attribute writes, one lock hold and one wake-up.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from keras_tandem.errors import Overloaded, PredictorClosed

log = logging.getLogger("keras_tandem.serving")
_get_ident = threading.get_ident
# A caller thread counts as active (likely to send again soon) this long after its last request.
_ACTIVE_S = 0.1
_CALLERS_MAX = 4096


class Request:
    """One caller's rows, waiting for an answer.

    `arrays` holds the rows as one flat, C-contiguous byte view per model
    input, ready to be copied into the batch buffer (for a string input, the
    object array of its rows).

    Exactly one way of answering is set: `waiter` (a held lock, released
    when the answer is ready), `future`, `callback` (called on the worker
    thread with `(result, error)`), or `loop_future` (an asyncio future,
    resolved on its loop by `bridge`, a `_loop_bridge.LoopBridge`, to which
    the worker posts the batch's loop requests once the batch is answered:
    `finish` and `fail` only store the answer for those; the bridge also
    keeps its deadline). `more_follow`
    marks a chunk of a split request that has further chunks queued right
    behind it: no weight swap may come between them, so every chunk of one
    request sees one version.
    """

    __slots__ = (
        "abandoned",
        "arrays",
        "bridge",
        "callback",
        "deadline",
        "enqueued",
        "error",
        "future",
        "loop_future",
        "more_follow",
        "result",
        "rows",
        "single",
        "version",
        "waiter",
        "with_version",
    )

    def __init__(self, arrays, rows, single, waiter, future, deadline, with_version=False,
                 more_follow=False, callback=None, loop_future=None, bridge=None):
        self.arrays = arrays
        self.rows = rows
        self.single = single
        self.waiter = waiter
        self.future = future
        self.deadline = deadline
        self.with_version = with_version
        self.more_follow = more_follow
        self.callback = callback
        self.loop_future = loop_future
        self.bridge = bridge
        self.enqueued = 0.0
        self.result = None
        self.error = None
        self.version = -1
        self.abandoned = False  # the caller gave up (deadline): skip it

    def finish(self, result: Any, version: int) -> None:
        """Hands the answer to the caller (called by the worker)."""
        self.version = version
        if self.future is not None:
            self.future.set_result((result, version) if self.with_version else result)
        elif self.callback is not None:
            call_back(self.callback, (result, version) if self.with_version else result, None)
        else:
            self.result = result
            if self.waiter is not None:
                self.waiter.release()

    def fail(self, error: BaseException) -> None:
        """Hands an error to the caller (called by the worker)."""
        if self.future is not None:
            self.future.set_exception(error)
        elif self.callback is not None:
            call_back(self.callback, None, error)
        else:
            self.error = error
            if self.waiter is not None:
                self.waiter.release()


def call_back(callback: Any, result: Any, error: BaseException | None) -> None:
    """Calls a `submit(callback=...)` callback; what it raises is logged, never propagated."""
    try:
        callback(result, error)
    except Exception:  # a caller's bug must not stop the worker or fail the batch
        log.exception("A submit(callback=...) callback raised; the worker goes on.")


class Clock:
    """The time source and the waits of a `BatchQueue`.

    Both are the library functions themselves (no wrapper on the hot path).
    A test replaces them with a fake whose `now()` reads virtual time and
    whose `wait(condition, timeout)` advances it, so the wait rules run
    without depending on how fast the machine is.
    """

    now = staticmethod(time.perf_counter)
    wait = staticmethod(threading.Condition.wait)  # (condition, timeout) -> bool


class BatchQueue:
    """A bounded FIFO of requests, drained by one worker in batches.

    Args:
        capacity: most requests that may wait; `put` beyond it raises `Overloaded`.
        max_rows: most rows in one batch.
        max_delay_s: under load, how long the worker may wait (from the
            oldest queued request) for a batch to fill: to the size of the
            last batch, or under a steady stream from several threads, with
            the requests the measured arrival rate says will come in time. A
            request from a lone caller, or one arriving after a quiet spell,
            never waits for it.
        clock: where the queue reads the time (`clock.now()`, seconds) and
            waits on its condition (`clock.wait(condition, timeout)`); the
            real `Clock` by default.
    """

    def __init__(self, capacity: int, max_rows: int, max_delay_s: float,
                 clock: Clock | None = None):
        clock = Clock() if clock is None else clock
        self._now = clock.now
        self._wait = clock.wait
        self.capacity = capacity
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._items: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._worker_waiting = False
        self._closed = False
        self._wake_requested = False
        self._rows = 0  # rows queued in all
        self._want_rows = 1  # a put wakes the waiting worker once this many rows are queued
        self._callers: dict[int, float] = {}  # caller thread -> time of its last request
        self._last_put = self._now()
        self._gap = 1.0  # moving average of the time between requests, seconds
        self._steady = False  # the newest request came about when the stream said it would
        self.pass_s = 0.0  # moving average of a forward pass, kept by the worker
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, request: Request, notify: bool = True) -> None:
        """Queues one request, or raises `Overloaded` / `PredictorClosed` at once.

        Args:
            request: the request.
            notify: wake the waiting worker if the request completes what it
                waits for. False leaves that to a later `notify()` (the loop
                bridge calls it once per pass of an event loop).
        """
        read_clock = self._now  # called as a local: `self._now()` is a slower lookup
        request.enqueued = now = read_clock()
        caller = _get_ident()
        with self._lock:
            if self._closed:
                raise PredictorClosed("The Predictor is closed and accepts no new requests.")
            if len(self._items) >= self.capacity:
                self.rejected += 1
                raise Overloaded(
                    f"The request queue is full ({self.capacity} requests waiting): "
                    "retry later, or create the Predictor with a larger queue_size."
                )
            self._items.append(request)
            self._rows += request.rows
            gap = now - self._last_put
            self._steady = gap <= 3 * self._gap  # else the stream paused before this one
            self._gap += (gap - self._gap) * 0.25
            self._last_put = now
            self._callers[caller] = now
            if len(self._callers) > _CALLERS_MAX:  # threads come and go: forget the idle
                self._forget_idle_callers(now)
            if notify and self._worker_waiting and self._rows >= self._want_rows:
                self._ready.notify()

    def notify(self) -> None:
        """Wakes the waiting worker if what is queued completes what it waits for."""
        with self._lock:
            if self._worker_waiting and self._rows >= self._want_rows:
                self._ready.notify()

    def put_all(self, requests: list[Request]) -> None:
        """Queues the chunks of one split request together, all or none."""
        read_clock = self._now
        now = read_clock()
        for r in requests:
            r.enqueued = now
        with self._lock:
            if self._closed:
                raise PredictorClosed("The Predictor is closed and accepts no new requests.")
            if len(self._items) + len(requests) > self.capacity:
                self.rejected += 1
                raise Overloaded(
                    f"The request queue cannot take {len(requests)} more chunks "
                    f"({len(self._items)} of {self.capacity} places taken): retry later, "
                    "or create the Predictor with a larger queue_size."
                )
            self._items.extend(requests)
            self._rows += sum(r.rows for r in requests)
            self._last_put = now
            if self._worker_waiting and self._rows >= self._want_rows:
                self._ready.notify()

    def wake(self) -> None:
        """Makes a waiting `take` return, so the worker can do other work."""
        with self._lock:
            self._wake_requested = True
            self._ready.notify()

    def close(self) -> None:
        """Refuses new requests; `take` keeps returning what is queued, then None."""
        with self._lock:
            self._closed = True
            self._ready.notify()

    def take(self, expect_rows: int = 0) -> list[Request] | None:
        """Blocks until requests are queued and returns a batch of them.

        Args:
            expect_rows: rows the worker expects soon, from the size of its
                last batch. While fewer are queued, it may wait up to
                `max_delay_s` (from the oldest request) for them, or for
                the requests a steady stream from other callers will bring
                in time (see `_stream_rows`).

        Returns:
            Requests in FIFO order with at most `max_rows` rows in all; an empty
            list when woken by `wake()`; None once closed and drained.
        """
        items = self._items
        with self._lock:
            while not items:
                if self._closed:
                    return None
                if self._wake_requested:
                    self._wake_requested = False
                    return []
                self._worker_waiting = True
                self._wait(self._ready, None)
                self._worker_waiting = False
            if self.max_delay_s > 0 and not self._closed:
                expected = expect_rows if expect_rows > 1 else 0
                stream = self._stream_rows(items)
                if stream > max(expected, self._rows):
                    # Give up early if the stream stops: after a few gaps with no request.
                    self._wait_to_fill(items, min(stream, self.max_rows), patience=3 * self._gap)
                elif expected > self._rows:
                    self._wait_to_fill(items, min(expected, self.max_rows))
            self._wake_requested = False
            return self._pop_batch(items)

    def note_pass(self, seconds: float) -> None:
        """Records how long a forward pass took (called by the worker)."""
        self.pass_s += (seconds - self.pass_s) * 0.25

    def _stream_rows(self, items: collections.deque[Request]) -> int:
        """Rows worth waiting for: those queued plus the arrivals due before the deadline.

        Called with the lock held. When requests trickle in from several
        threads more slowly than a forward pass runs (an open-loop load:
        each request arrives on its own schedule, not after an answer),
        each pass would serve one request, and every pass costs about the
        same CPU however few rows it has: a short wait that lets more
        requests join saves whole passes. Requests that come faster than a
        pass runs pile up during it, so no wait is needed. No wait either
        when no other caller is active (a lone caller would only wait for
        itself), when the newest request came after a pause (a gap over
        three times the usual), or when the next request is not due before
        the oldest one's deadline.
        """
        read_clock = self._now
        now = read_clock()
        remaining = items[0].enqueued + self.max_delay_s - now
        gap = self._gap
        if (remaining <= gap or gap <= self.pass_s or not self._steady
                or now - self._last_put > 2 * gap):
            return 0  # not worth it, not due in time, or the stream paused
        self._forget_idle_callers(now)
        others = len(self._callers) - len(items)  # active callers with nothing queued
        if others <= 0:
            return 0
        return self._rows + min(others, int(remaining / gap))

    def _forget_idle_callers(self, now: float) -> None:
        horizon = now - _ACTIVE_S
        callers = self._callers
        for c in [c for c, seen in callers.items() if seen < horizon]:
            del callers[c]

    def _wait_to_fill(self, items: collections.deque[Request], rows: int,
                      patience: float | None = None) -> None:
        # Called with the lock held. Waits until `rows` are queued or the
        # oldest request has waited max_delay_s, whichever comes first; with
        # `patience`, also stops once the missing rows are `patience` late
        # (due one gap apart after the last request). Timing that from the
        # last request alone would wake the worker every few gaps while a
        # steady stream still flows: each such wake is a context switch that
        # a training thread pays for.
        deadline = items[0].enqueued + self.max_delay_s
        self._want_rows = rows
        try:
            while self._rows < rows:
                now = self._now()
                remaining = deadline - now
                if patience is not None:
                    due = self._last_put + (rows - self._rows) * self._gap
                    remaining = min(remaining, due + patience - now)
                if remaining <= 0 or self._closed or self._wake_requested:
                    return
                self._worker_waiting = True
                self._wait(self._ready, remaining)
                self._worker_waiting = False
        finally:
            self._worker_waiting = False
            self._want_rows = 1

    def _pop_batch(self, items: collections.deque[Request]) -> list[Request]:
        if self._rows <= self.max_rows:
            batch = list(items)
            items.clear()
            self._rows = 0
            return batch
        batch = []
        rows = 0
        while items and rows + items[0].rows <= self.max_rows:
            r = items.popleft()
            rows += r.rows
            batch.append(r)
        self._rows -= rows
        return batch
