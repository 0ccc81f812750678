"""The hand-off ceiling: what waking Python threads costs, with no inference.

Client threads hand single requests to one worker thread through a deque and
a condition; each waits on its own lock, which the worker releases. No design
that blocks a thread per request can beat this on the same machine.
"""

from __future__ import annotations

import collections
import threading
from _thread import allocate_lock
from typing import Any


class HandOff:
    """A worker that answers every request at once, in bulk, doing nothing else."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self._worker = threading.Thread(target=self._serve, daemon=True)
        self._worker.start()

    def call(self, x: Any) -> Any:
        """Hands `x` to the worker and waits until it is released."""
        waiter = allocate_lock()
        waiter.acquire()
        with self._ready:
            self._items.append(waiter)
            self._ready.notify()
        waiter.acquire()
        return x

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._worker.join()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._items and not self._closed:
                    self._ready.wait()
                if self._closed and not self._items:
                    return
                batch = list(self._items)
                self._items.clear()
            for waiter in batch:
                waiter.release()
