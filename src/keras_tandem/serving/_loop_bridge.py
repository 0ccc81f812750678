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
per request. Pure Python: no TensorFlow, no NumPy.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
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
            if r.timer is not None:
                r.timer.cancel()
            future = r.loop_future
            if future.done():  # cancelled, or timed out on the loop
                continue
            if r.error is not None:
                future.set_exception(r.error)
            elif r.with_version:
                future.set_result((r.result, r.version))
            else:
                future.set_result(r.result)


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
