"""Counters and a latency window for `Predictor.stats()`.

Written by the worker thread once per batch (never per request on the
caller's path); read by anyone, at any time, as a consistent-enough snapshot.
"""

from __future__ import annotations

import numpy as np

# Upper bounds (seconds) of the queue-wait histogram in `stats()`: from a
# request joining the queue to its batch starting.
QUEUE_WAIT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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

    def record_batch(self, requests: int, rows: int, latencies: np.ndarray,
                     waits: np.ndarray | None = None) -> None:
        """Adds one finished batch, its requests' latencies and queue waits (seconds)."""
        if waits is not None:
            self.queue_wait_s += float(waits.sum())
            if len(waits) == 1:  # the common batch of one: no array work
                self.queue_wait_counts[int(self._wait_bounds.searchsorted(waits[0]))] += 1
            else:
                self.queue_wait_counts += np.bincount(
                    self._wait_bounds.searchsorted(waits), minlength=len(self.queue_wait_counts))
        self.requests += requests
        self.rows += rows
        self.batches += 1
        window = len(self._latencies)
        n = min(len(latencies), window)
        start = self._next
        end = start + n
        if end <= window:
            self._latencies[start:end] = latencies[:n]
        else:
            split = window - start
            self._latencies[start:] = latencies[:split]
            self._latencies[: n - split] = latencies[split:n]
        self._next = end % window
        self._filled = min(window, self._filled + n)

    def snapshot(self) -> dict[str, float]:
        """Returns counts, mean batch size, p50/p99 latency in milliseconds, queue waits.

        `queue_wait_counts` counts requests by queue wait, one entry per bound
        of `QUEUE_WAIT_BOUNDS` (wait <= bound, above the previous bound) and a
        last one beyond; `queue_wait_seconds` is their total wait.
        """
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
