"""Answers for asyncio callers: one loop wake-up per batch per event loop.

Separation of concerns: `Predictor.submit(x, loop=...)` (and so `apredict`)
queues a `Request` that carries an asyncio future of the caller's loop
(`Request.loop_future`) and that loop's `LoopBridge` (`bridge_for`); the
worker stores each answer on its request and, once per batch, hands the batch's loop requests to
`post_answers`, which groups them by loop. Each `LoopBridge` keeps the
answers not yet delivered and schedules one `_drain` on its loop with
`call_soon_threadsafe`; answers that arrive before that drain runs join it.
So an event loop is woken at most once per batch, however many of its
coroutines the batch answers, and no `concurrent.futures.Future` is made
per request.

The other direction is batched too. A loop request is queued at once (so
`Overloaded` and `PredictorClosed` still raise in `submit`), but the worker
is woken once per loop pass, by a callback the bridge schedules after the
first request of the pass (`notify_later`), rather than by each request: the
requests one pass of the loop handles (one per ready connection, for the
server) reach the worker as one batch. Deadlines are one sweep per loop and
timeout, not a timer per request: `watch` appends the future to a FIFO of
that timeout (so ordered by deadline), answered futures leave its head as
they are drained, and one `call_at` on the oldest deadline fails what is
left unanswered. Pure Python: no TensorFlow, no NumPy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge] = \
    weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()


class LoopBridge:
    """Delivers answers computed on the worker thread to the futures of one event loop.

    Args:
        loop: the event loop whose futures this bridge resolves. The bridge
            holds it weakly: a closed and dropped loop is simply not woken.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()  # guards _pending and _scheduled
        self._pending: list[Any] = []
        self._scheduled = False
        # Touched on the loop's own thread only: no lock.
        self._to_notify: list[Any] = []  # queues whose worker is woken at the end of this pass
        self._deadlines: dict[float, collections.deque[Any]] = {}  # timeout -> FIFO of watches
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0

    def notify_later(self, queue: Any) -> None:
        """Wakes `queue`'s worker once this pass of the loop is over (on the loop's thread).

        The request is already queued; the first call of a pass schedules
        one callback that wakes every queue named during the pass.
        """
        pending = self._to_notify
        if not pending:
            loop = self._loop()
            try:
                loop.call_soon(self._notify)
            except (AttributeError, RuntimeError):  # a dropped or closed loop: wake it now
                queue.notify()
                return
        if queue not in pending:
            pending.append(queue)

    def _notify(self) -> None:
        pending, self._to_notify = self._to_notify, []
        for queue in pending:
            queue.notify()

    def watch(self, future: asyncio.Future, timeout_s: float,
              expire: Callable[[asyncio.Future], None]) -> None:
        """Calls `expire(future)` `timeout_s` from now unless it is done by then.

        On the loop's thread. One FIFO per timeout keeps deadlines in order;
        one timer, on the oldest deadline, serves all of them.
        """
        loop = self._loop()
        deadline = loop.time() + timeout_s
        fifo = self._deadlines.get(timeout_s)
        if fifo is None:
            fifo = self._deadlines[timeout_s] = collections.deque()
        fifo.append((deadline, future, expire))
        if self._sweep is None or deadline < self._sweep_at:
            self._schedule_sweep(loop, deadline)

    def _schedule_sweep(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        self._sweep = loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        self._sweep = None
        loop = self._loop()
        now = loop.time()
        nearest = None
        for timeout_s, fifo in list(self._deadlines.items()):
            while fifo and (fifo[0][1].done() or fifo[0][0] <= now):
                _, future, expire = fifo.popleft()
                if not future.done():
                    expire(future)
            if not fifo:
                del self._deadlines[timeout_s]
            elif nearest is None or fifo[0][0] < nearest:
                nearest = fifo[0][0]
        if nearest is not None:
            self._schedule_sweep(loop, nearest)

    def _forget_answered(self) -> None:
        # Answered futures leave the head of their FIFO, so the FIFOs hold
        # about what is in flight; the sweep timer stays where it is.
        for fifo in self._deadlines.values():
            while fifo and fifo[0][1].done():
                fifo.popleft()

    def post(self, requests: list[Any]) -> None:
        """Queues finished requests of this loop; wakes it unless a wake-up is pending.

        Called on the worker thread, once per batch.
        """
        with self._lock:
            self._pending.extend(requests)
            if self._scheduled:
                return  # the drain already scheduled has not run yet: it takes these too
            self._scheduled = True
        loop = self._loop()
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            done, self._pending = self._pending, []
            self._scheduled = False
        for r in done:
            future = r.loop_future
            if future.done():  # cancelled, or timed out on the loop
                continue
            if r.error is not None:
                future.set_exception(r.error)
            elif r.with_version:
                future.set_result((r.result, r.version))
            else:
                future.set_result(r.result)
        if self._deadlines:
            self._forget_answered()


def bridge_for(loop: asyncio.AbstractEventLoop) -> LoopBridge:
    """The one `LoopBridge` of `loop`, made on first use and shared by every Predictor."""
    bridge = _bridges.get(loop)
    if bridge is None:
        with _bridges_lock:
            bridge = _bridges.get(loop)
            if bridge is None:
                bridge = _bridges[loop] = LoopBridge(loop)
    return bridge


def post_answers(requests: list[Any]) -> None:
    """Hands a batch's finished loop requests to their bridges: one `post` per loop."""
    first = requests[0].bridge
    for r in requests:
        if r.bridge is not first:
            break
    else:
        first.post(requests)  # the common case: one loop
        return
    by_bridge: dict[LoopBridge, list[Any]] = {}
    for r in requests:
        by_bridge.setdefault(r.bridge, []).append(r)
    for bridge, mine in by_bridge.items():
        bridge.post(mine)
