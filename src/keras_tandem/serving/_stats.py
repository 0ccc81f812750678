"""Counters and a latency window for `Predictor.stats()`.

Written by the worker thread once per batch (never per request on the
caller's path); read by anyone, at any time, as a consistent-enough snapshot.
"""

from __future__ import annotations

import numpy as np


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
        self._filled = 0
        self._next = 0

    def record_batch(self, requests: int, rows: int, latencies: np.ndarray) -> None:
        """Adds one finished batch and its requests' latencies (seconds)."""
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
        """Returns counts, mean batch size and p50/p99 latency in milliseconds."""
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
        }
