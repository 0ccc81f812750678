"""Prometheus metrics of one server, in a registry of its own.

Owns: the HTTP-side counters and latency histogram (recorded by the request
handlers on the event loop, and by gRPC's), and a collector that reads the
Predictors' `stats()` at scrape time. A request is counted into plain
Python counts under one lock (`_RequestCounts`: a dict lookup and a bucket
index, no prometheus-client child per call); they become the Prometheus
families, `_created` series included, only when scraped
(`_RequestCollector`). Every metric has a `model` label; a model's batcher
metrics (queue depth, batch sizes, queue waits, requests, batches,
rejections) add up all of its Predictors: every loaded version and every
signature. Counters and histograms are kept from `stats()` deltas, so
they never go backwards when a Predictor is replaced or a version unloaded
(a retired Predictor's last stats are taken when it closes). Each server has
its own `CollectorRegistry`, so several servers (tests) never clash.

The batch-size histogram is sampled every half second and at each scrape:
its `_count` (batches) and `_sum` (rows) are exact; each sample's batches go
into the bucket of that interval's mean batch size (the Predictor has no
public per-batch hook). The queue-wait histogram is exact: the Predictor
counts each request's wait in `QUEUE_WAIT_BOUNDS`.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from keras_tandem.serving.specs import QUEUE_WAIT_BOUNDS, bucket_sizes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)

class BatchSizeHistogram:
    """A cumulative batch-size histogram fed from `stats()` snapshots of one or more Predictors.

    Args:
        max_batch_size: the Predictors' largest batch. The bucket bounds are
            the batch sizes the forward pass runs at (`bucket_sizes`).
    """

    def __init__(self, max_batch_size: int):
        bounds = bucket_sizes(max_batch_size)
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0
        self._last: dict[Any, tuple[int, float]] = {}  # source -> (batches, rows) seen
        self._lock = threading.Lock()

    def sample(self, source: Any, stats: dict[str, Any]) -> None:
        """Adds the batches `source` ran since its previous sample.

        Args:
            source: the Predictor the stats came from (a new one starts from zero).
            stats: its `stats()` snapshot.
        """
        batches = int(stats.get("batches", 0))
        rows = float(stats.get("mean_batch_size", 0.0)) * batches
        with self._lock:
            seen_batches, seen_rows = self._last.get(source, (0, 0.0))
            d_batches, d_rows = batches - seen_batches, rows - seen_rows
            if d_batches <= 0:
                return
            self._last[source] = (batches, rows)
            mean = d_rows / d_batches
            i = next((k for k, bound in enumerate(self.bounds) if mean <= bound),
                     len(self.bounds))
            self.counts[i] += d_batches
            self.count += d_batches
            self.sum += d_rows

    def forget(self, source: Any) -> None:
        """Drops a retired source (after its last sample)."""
        with self._lock:
            self._last.pop(source, None)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative `(le, count)` pairs, ending with `+Inf`."""
        with self._lock:
            return _cumulative(self.bounds, self.counts)


def _cumulative(bounds: Any, counts: list[int]) -> list[tuple[str, int]]:
    out, total = [], 0
    for bound, c in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        total += c
        out.append((bound, total))
    return out


_COUNTERS = ("requests", "batches", "rejected", "queue_wait_seconds")


@dataclass
class _ModelStats:
    """A model's batcher figures, summed over its Predictors, kept from stats() deltas."""

    max_batch_size: int
    current: Callable[[], tuple[Any, Any]]
    predictors: Callable[[], list[Any]]
    load_failures: Callable[[], int]
    batch_sizes: BatchSizeHistogram = field(init=False)
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_COUNTERS, 0.0))
    wait_counts: list[int] = field(default_factory=lambda: [0] * (len(QUEUE_WAIT_BOUNDS) + 1))
    queue_depth: float = 0.0
    _last: dict[Any, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.batch_sizes = BatchSizeHistogram(self.max_batch_size)

    def take(self, source: Any, stats: dict[str, Any]) -> None:
        self.batch_sizes.sample(source, stats)
        with self._lock:
            last = self._last.get(source, {})
            for key in _COUNTERS:
                value = float(stats.get(key, 0.0))
                delta = value - float(last.get(key, 0.0))
                if delta > 0:
                    self.totals[key] += delta
            counts = list(stats.get("queue_wait_counts") or [])
            seen = last.get("queue_wait_counts") or [0] * len(counts)
            for i, (c, s) in enumerate(zip(counts, seen, strict=False)):
                if i < len(self.wait_counts) and c > s:
                    self.wait_counts[i] += c - s
            self._last[source] = stats

    def sample(self) -> list[dict[str, Any]]:
        snapshots = []
        depth = 0.0
        for p in self.predictors():
            stats = p.stats()
            self.take(p, stats)
            depth += float(stats.get("queue_depth", 0))
            snapshots.append(stats)
        self.queue_depth = depth
        return snapshots

    def retire(self, source: Any) -> None:
        self.take(source, source.stats())
        self.batch_sizes.forget(source)
        with self._lock:
            self._last.pop(source, None)


class ServerMetrics:
    """The metrics of a server's models.

    Args:
        model_name: the `model` label of requests that name no served model
            (a single-model server: its name), and, with `current`, a first model.
        max_batch_size: that model's largest batch (bucket bounds).
        current: returns `(predictor, model_version)` now answering, or `(None, None)`.
        load_failures: returns how many version loads failed so far.
    """

    def __init__(self, model_name: str = "", max_batch_size: int = 256,
                 current: Callable[[], tuple[Any, Any]] | None = None,
                 load_failures: Callable[[], int] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_name = model_name
        self._models: dict[str, _ModelStats] = {}
        self._lock = threading.Lock()
        self.requests = _RequestCounts()
        self.registry.register(_RequestCollector(self.requests))
        self.registry.register(_PredictorCollector(self))
        if current is not None:
            self.add_model(model_name, max_batch_size, current,
                           lambda: [p] if (p := current()[0]) is not None else [],
                           load_failures or (lambda: 0))

    def add_model(self, name: str, max_batch_size: int, current: Callable[[], tuple[Any, Any]],
                  predictors: Callable[[], list[Any]],
                  load_failures: Callable[[], int]) -> None:
        """Adds a model's batcher metrics.

        Args:
            name: the `model` label.
            max_batch_size: its Predictors' largest batch (bucket bounds).
            current: returns `(predictor, model_version)` answering requests
                that name no version, or `(None, None)`.
            predictors: returns every Predictor of the model now (all loaded
                versions and signatures).
            load_failures: returns how many version loads failed so far.
        """
        with self._lock:
            self._models[name] = _ModelStats(max_batch_size, current, predictors, load_failures)

    def remove_model(self, name: str) -> None:
        """Drops a model that is no longer served (its series disappear)."""
        with self._lock:
            self._models.pop(name, None)

    def observe(self, endpoint: str, code: int, seconds: float | None = None,
                error_kind: str | None = None, model: str | None = None) -> None:
        """Counts one answered request (and its latency, for predict-like endpoints).

        Args:
            endpoint: `predict`, `classify`, `status`, ... (`other` for no route).
            code: the HTTP status code (gRPC: its HTTP equivalent).
            seconds: the request's latency, if measured.
            error_kind: the kind of error, if it failed.
            model: the served model the request named (None or unknown: the
                server's default label).
        """
        # An unknown name counts under the default label: no series per name a client makes up.
        self.requests.add(model if model in self._models else self.model_name, endpoint, code,
                          seconds, error_kind)

    def sample(self) -> None:
        """Feeds every model's histograms and totals from its Predictors' stats."""
        with self._lock:
            models = list(self._models.values())
        for m in models:
            m.sample()

    def sample_retired(self, predictor: Any, model: str | None = None) -> None:
        """Takes the last stats of a Predictor that was unloaded or replaced.

        Args:
            predictor: the retired Predictor.
            model: its model (default: the server's default label).
        """
        m = self._models.get(model if model is not None else self.model_name)
        if m is not None:
            m.retire(predictor)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _RequestCounts:
    """Requests, errors and latencies as plain counts, added to on the request path.

    Each series remembers when it was first counted (its `_created` sample).
    Thread-safe: the REST handlers and gRPC's count from different threads.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (model, endpoint, code) / (model, kind) -> [count, created]
        self.requests: dict[tuple[str, str, int], list[float]] = {}
        self.errors: dict[tuple[str, str], list[float]] = {}
        # model -> [bucket counts (the last one +Inf), sum, created]
        self.latency: dict[str, list[Any]] = {}

    def add(self, model: str, endpoint: str, code: int, seconds: float | None,
            error_kind: str | None) -> None:
        with self.lock:
            entry = self.requests.get((model, endpoint, code))
            if entry is None:
                entry = self.requests[(model, endpoint, code)] = [0, time.time()]
            entry[0] += 1
            if seconds is not None:
                hist = self.latency.get(model)
                if hist is None:
                    hist = self.latency[model] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0,
                                                  time.time()]
                # `le` buckets: a value on a bound counts in that bound's bucket.
                hist[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                hist[1] += seconds
            if error_kind is not None:
                entry = self.errors.get((model, error_kind))
                if entry is None:
                    entry = self.errors[(model, error_kind)] = [0, time.time()]
                entry[0] += 1


_LE = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]


class _RequestCollector:
    """`_RequestCounts` as the families prometheus-client's `Counter` and `Histogram` would give."""

    def __init__(self, counts: _RequestCounts):
        self._counts = counts

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        counts = self._counts
        with counts.lock:
            requests = [(k, *v) for k, v in counts.requests.items()]
            errors = [(k, *v) for k, v in counts.errors.items()]
            latency = [(k, list(v[0]), v[1], v[2]) for k, v in counts.latency.items()]
        created = getattr(_prometheus_metrics, "_use_created", True)
        family = CounterMetricFamily(
            "keras_tandem_http_requests", "HTTP requests answered, by endpoint and status code.",
            labels=["model", "endpoint", "code"])
        for (model, endpoint, code), n, t in requests:
            family.add_metric([model, endpoint, str(code)], float(n), t if created else None)
        yield family
        family = CounterMetricFamily(
            "keras_tandem_http_errors", "HTTP requests that failed, by kind of error.",
            labels=["model", "kind"])
        for (model, kind), n, t in errors:
            family.add_metric([model, kind], float(n), t if created else None)
        yield family
        name = "keras_tandem_http_request_duration_seconds"
        family = HistogramMetricFamily(
            name, "Time from reading a predict request to its response being ready.",
            labels=["model"])
        for model, buckets, total, t in latency:
            cumulative, running = [], 0
            for le, n in zip(_LE, buckets, strict=True):
                running += n
                cumulative.append((le, float(running)))
            family.add_metric([model], cumulative, total)
            if created:
                family.samples.append(Sample(f"{name}_created", {"model": model}, t))
        yield family


class _PredictorCollector:
    def __init__(self, metrics: ServerMetrics):
        self._m = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        m = self._m
        with m._lock:
            models = sorted(m._models.items())
        families = {
            "batch": HistogramMetricFamily(
                "keras_tandem_batch_size", "Rows per forward pass of the model's Predictors.",
                labels=["model"]),
            "wait": HistogramMetricFamily(
                "keras_tandem_queue_wait_seconds",
                "Time requests waited in the batching queue before their batch started.",
                labels=["model"]),
            "failures": CounterMetricFamily(
                "keras_tandem_version_load_failures", "Model versions that failed to load.",
                labels=["model"]),
            "version": GaugeMetricFamily("keras_tandem_model_version",
                                         "The model version answering requests naming none.",
                                         labels=["model"]),
            "depth": GaugeMetricFamily("keras_tandem_queue_depth",
                                       "Requests waiting in the model's Predictors' queues.",
                                       labels=["model"]),
            "weights": GaugeMetricFamily("keras_tandem_weight_version",
                                         "The weight version of the Predictor answering now.",
                                         labels=["model"]),
            "mean": GaugeMetricFamily("keras_tandem_mean_batch_size",
                                      "Mean rows per forward pass since start.",
                                      labels=["model"]),
            "p99": GaugeMetricFamily("keras_tandem_predictor_p99_latency_seconds",
                                     "The answering Predictor's p99 latency over recent "
                                     "requests.", labels=["model"]),
            "requests": CounterMetricFamily("keras_tandem_predictor_requests",
                                            "Requests the model's Predictors answered.",
                                            labels=["model"]),
            "batches": CounterMetricFamily("keras_tandem_predictor_batches",
                                           "Forward passes the model's Predictors ran.",
                                           labels=["model"]),
            "rejected": CounterMetricFamily("keras_tandem_predictor_rejected",
                                            "Requests refused because a queue was full.",
                                            labels=["model"]),
        }
        for name, s in models:
            labels = [name]
            s.sample()
            predictor, version = s.current()
            families["batch"].add_metric(labels, s.batch_sizes.buckets(), s.batch_sizes.sum)
            with s._lock:
                waits = _cumulative(QUEUE_WAIT_BOUNDS, s.wait_counts)
                totals = dict(s.totals)
            families["wait"].add_metric(labels, waits, totals["queue_wait_seconds"])
            families["failures"].add_metric(labels, s.load_failures())
            families["depth"].add_metric(labels, s.queue_depth)
            families["requests"].add_metric(labels, totals["requests"])
            families["batches"].add_metric(labels, totals["batches"])
            families["rejected"].add_metric(labels, totals["rejected"])
            if s.batch_sizes.count:
                families["mean"].add_metric(labels, s.batch_sizes.sum / s.batch_sizes.count)
            else:
                families["mean"].add_metric(labels, 0.0)
            if version is not None:
                families["version"].add_metric(labels, float(version))
            if predictor is not None:
                stats = predictor.stats()
                families["weights"].add_metric(labels, float(stats.get("version", 0)))
                families["p99"].add_metric(labels,
                                           float(stats.get("p99_latency_ms", 0.0)) / 1e3)
        yield from families.values()
