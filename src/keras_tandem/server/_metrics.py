"""Prometheus metrics of one server, in a registry of its own.

Owns: the HTTP-side counters and latency histogram (recorded by the request
handlers on the event loop), and a collector that reads the Predictor's
`stats()` at scrape time (queue depth, versions, batches). Each server has
its own `CollectorRegistry`, so several servers (tests) never clash and
`/metrics` shows only this server's model.

The batch-size histogram is built from `Predictor.stats()` deltas, sampled
every half second and at each scrape: its `_count` (batches) and `_sum` (rows)
are exact; each sample's batches go into the bucket of that interval's mean
batch size (the Predictor has no public per-batch hook).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from keras_tandem.serving.specs import bucket_sizes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)


class BatchSizeHistogram:
    """A cumulative batch-size histogram fed from `stats()` snapshots.

    Args:
        max_batch_size: the Predictor's largest batch. The bucket bounds are
            the batch sizes its forward pass runs at (`bucket_sizes`).
    """

    def __init__(self, max_batch_size: int):
        bounds = bucket_sizes(max_batch_size)
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self._source: Any = None
        self._batches = 0
        self._rows = 0.0
        self._lock = threading.Lock()

    def sample(self, source: Any, stats: dict[str, Any]) -> None:
        """Adds the batches `source` ran since its previous sample.

        Args:
            source: the Predictor the stats came from (a new one restarts counting).
            stats: its `stats()` snapshot.
        """
        batches = int(stats.get("batches", 0))
        rows = float(stats.get("mean_batch_size", 0.0)) * batches
        with self._lock:
            if source is not self._source:
                self._source, self._batches, self._rows = source, 0, 0.0
            d_batches, d_rows = batches - self._batches, rows - self._rows
            if d_batches <= 0:
                return
            self._batches, self._rows = batches, rows
            mean = d_rows / d_batches
            i = next((k for k, bound in enumerate(self.bounds) if mean <= bound),
                     len(self.bounds))
            self.counts[i] += d_batches
            self.count += d_batches
            self.sum += d_rows

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative `(le, count)` pairs, ending with `+Inf`."""
        with self._lock:
            out, total = [], 0
            for bound, c in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
                total += c
                out.append((bound, total))
            return out


class ServerMetrics:
    """The metrics of one served model.

    Args:
        model_name: the `model` label on every metric.
        max_batch_size: the Predictor's largest batch (bucket bounds).
        current: returns `(predictor, model_version)` now served, or `(None, None)`.
        load_failures: returns how many version loads failed so far.
    """

    def __init__(self, model_name: str, max_batch_size: int,
                 current: Callable[[], tuple[Any, Any]],
                 load_failures: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        self.batch_sizes = BatchSizeHistogram(max_batch_size)
        self._current = current
        self._load_failures = load_failures
        self.requests = Counter(
            "keras_tandem_http_requests", "HTTP requests answered, by endpoint and status code.",
            ["model", "endpoint", "code"], registry=self.registry)
        self.errors = Counter(
            "keras_tandem_http_errors", "HTTP requests that failed, by kind of error.",
            ["model", "kind"], registry=self.registry)
        self.latency = Histogram(
            "keras_tandem_http_request_duration_seconds",
            "Time from reading a predict request to its response being ready.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_PredictorCollector(self))
        self._latency = self.latency.labels(model_name)
        self._requests: dict[tuple[str, int], Any] = {}
        self._errors: dict[str, Any] = {}

    def observe(self, endpoint: str, code: int, seconds: float | None = None,
                error_kind: str | None = None) -> None:
        """Counts one answered request (and its latency, for predict)."""
        key = (endpoint, code)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(self.model_name, endpoint,
                                                               str(code))
        child.inc()
        if seconds is not None:
            self._latency.observe(seconds)
        if error_kind is not None:
            err = self._errors.get(error_kind)
            if err is None:
                err = self._errors[error_kind] = self.errors.labels(self.model_name, error_kind)
            err.inc()

    def sample(self) -> dict[str, Any] | None:
        """Feeds the batch-size histogram from the served Predictor's stats."""
        predictor, _ = self._current()
        if predictor is None:
            return None
        stats = predictor.stats()
        self.batch_sizes.sample(predictor, stats)
        return stats

    def sample_retired(self, predictor: Any) -> None:
        """Takes a last sample of a Predictor that is being replaced."""
        self.batch_sizes.sample(predictor, predictor.stats())

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _PredictorCollector:
    def __init__(self, metrics: ServerMetrics):
        self._m = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        m = self._m
        labels = [m.model_name]
        stats = m.sample()
        _, version = m._current()
        hist = HistogramMetricFamily(
            "keras_tandem_batch_size", "Rows per forward pass of the Predictor.",
            labels=["model"])
        hist.add_metric(labels, m.batch_sizes.buckets(), m.batch_sizes.sum)
        yield hist
        failures = CounterMetricFamily(
            "keras_tandem_version_load_failures", "Model versions that failed to load.",
            labels=["model"])
        failures.add_metric(labels, m._load_failures())
        yield failures
        if version is not None:
            g = GaugeMetricFamily("keras_tandem_model_version",
                                  "The model version now served.", labels=["model"])
            g.add_metric(labels, float(version))
            yield g
        if stats is None:
            return
        gauges = [
            ("keras_tandem_queue_depth", "Requests waiting in the Predictor's queue.",
             "queue_depth"),
            ("keras_tandem_weight_version", "The Predictor's weight version now served.",
             "version"),
            ("keras_tandem_mean_batch_size", "Mean rows per forward pass since start.",
             "mean_batch_size"),
            ("keras_tandem_predictor_p99_latency_seconds",
             "The Predictor's p99 latency over recent requests.", "p99_latency_ms"),
        ]
        for name, doc, key in gauges:
            g = GaugeMetricFamily(name, doc, labels=["model"])
            value = float(stats.get(key, 0.0))
            g.add_metric(labels, value / 1e3 if key.endswith("_ms") else value)
            yield g
        counters = [
            ("keras_tandem_predictor_requests", "Requests the Predictor answered.", "requests"),
            ("keras_tandem_predictor_batches", "Forward passes the Predictor ran.", "batches"),
            ("keras_tandem_predictor_rejected", "Requests refused because the queue was full.",
             "rejected"),
        ]
        for name, doc, key in counters:
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric(labels, float(stats.get(key, 0)))
            yield c
