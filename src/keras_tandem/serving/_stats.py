"""Counters and a latency window for `Predictor.stats()`.

Written by the worker thread once per batch (never per request on the
caller's path); read by anyone, at any time, as a consistent-enough snapshot.
"""

from __future__ import annotations

import collections
import itertools
import threading

import numpy as np

# Upper bounds (seconds) of the queue-wait histogram in `stats()`: from a
# request joining the queue to its batch starting.
QUEUE_WAIT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Batches recorded before their latencies and waits are folded into the window
# and the histogram (also folded on every snapshot).
_FOLD_BATCHES = 64


class ServingStats:
    """Request, batch and latency counters.

    Args:
        window: how many recent request latencies the percentiles cover.
    """

    def __init__(self, window: int = 8192):
        self.requests = 0
        self.rows = 0
        self.batches = 0
        self.errors = 0
        self.invalid = 0
        self.timeouts = 0
        self._latencies = np.zeros(window)
        self.queue_wait_s = 0.0
        self._wait_bounds = np.asarray(QUEUE_WAIT_BOUNDS)
        self.queue_wait_counts = np.zeros(len(QUEUE_WAIT_BOUNDS) + 1, np.int64)  # last: +Inf
        self._filled = 0
        self._next = 0
        self._pending: collections.deque = collections.deque()  # (done, start, enqueued)
        self._fold_lock = threading.Lock()

    def record_batch(self, requests: int, rows: int, done: float, start: float,
                     enqueued: list[float]) -> None:
        """Adds one finished batch.

        Cheap on purpose: the worker calls it once per batch, and under
        training it runs on cold caches, where each NumPy call costs several
        µs. The latency window and the queue-wait histogram are brought up
        to date in bulk every `_FOLD_BATCHES` batches and on `snapshot()`.

        Args:
            requests: requests answered.
            rows: their rows.
            done: when the forward pass ended (`time.perf_counter` seconds).
            start: when the batch started.
            enqueued: when each request joined the queue.
        """
        self.requests += requests
        self.rows += rows
        self.batches += 1
        self._pending.append((done, start, enqueued))
        if len(self._pending) >= _FOLD_BATCHES:
            self._fold()

    def _fold(self) -> None:
        """Moves the pending batches into the latency window and the queue-wait histogram."""
        with self._fold_lock:  # the worker and a reader of snapshot() may both fold
            pending = self._pending
            batches = [pending.popleft() for _ in range(len(pending))]
            if not batches:
                return
            sizes = [len(e) for _, _, e in batches]
            enqueued = np.fromiter(itertools.chain.from_iterable(e for _, _, e in batches),
                                   float, sum(sizes))
            latencies = np.repeat([d for d, _, _ in batches], sizes) - enqueued
            waits = np.repeat([s for _, s, _ in batches], sizes) - enqueued
            self.queue_wait_s += float(waits.sum())
            self.queue_wait_counts += np.bincount(
                self._wait_bounds.searchsorted(waits), minlength=len(self.queue_wait_counts))
            self._add_latencies(latencies)

    def _add_latencies(self, latencies: np.ndarray) -> None:
        window = len(self._latencies)
        latencies = latencies[-window:]  # the newest, if more than the window holds
        n = len(latencies)
        start = self._next
        end = start + n
        if end <= window:
            self._latencies[start:end] = latencies
        else:
            split = window - start
            self._latencies[start:] = latencies[:split]
            self._latencies[: n - split] = latencies[split:]
        self._next = end % window
        self._filled = min(window, self._filled + n)

    def snapshot(self) -> dict[str, float]:
        """Returns counts, mean batch size, p50/p99 latency in milliseconds, queue waits.

        `queue_wait_counts` counts requests by queue wait, one entry per bound
        of `QUEUE_WAIT_BOUNDS` (wait <= bound, above the previous bound) and a
        last one beyond; `queue_wait_seconds` is their total wait.
        """
        self._fold()
        recent = self._latencies[: self._filled]
        p50, p99 = (np.percentile(recent, [50, 99]) * 1e3) if len(recent) else (0.0, 0.0)
        return {
            "requests": self.requests,
            "batches": self.batches,
            "mean_batch_size": self.rows / self.batches if self.batches else 0.0,
            "p50_latency_ms": float(p50),
            "p99_latency_ms": float(p99),
            "errors": self.errors,
            "invalid_inputs": self.invalid,
            "timeouts": self.timeouts,
            "queue_wait_seconds": self.queue_wait_s,
            "queue_wait_counts": self.queue_wait_counts.tolist(),
        }
