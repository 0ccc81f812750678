"""The server's request metrics (`server/_metrics.py`) without a server.

Requests are counted into plain counts and turned into Prometheus families
at scrape time; the exposition must be what prometheus-client's own
`Counter` and `Histogram` give for the same requests, `_created` series
included.
"""

import re
import threading
import time

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from keras_tandem.server._metrics import LATENCY_BUCKETS, ServerMetrics

# (endpoint, code, seconds, error kind, model): two models, a name nobody
# serves (counted under the default label), values on and between bounds.
REQUESTS = [
    ("predict", 200, 0.003, None, "m"),
    ("predict", 200, 0.0005, None, "m"),
    ("predict", 200, 0.0025, None, "m"),
    ("predict", 400, 0.02, "invalid_input", "other"),
    ("status", 200, None, None, "nobody-serves-this"),
    ("other", 404, None, "not_found", None),
    ("predict", 200, 100.0, None, "other"),
    ("grpc_predict", 503, 0.25, "overloaded", "m"),
]


def _reference(requests, default):
    """The exposition prometheus-client's Counter and Histogram give for `requests`."""
    registry = CollectorRegistry(auto_describe=False)
    counted = Counter("keras_tandem_http_requests",
                      "HTTP requests answered, by endpoint and status code.",
                      ["model", "endpoint", "code"], registry=registry)
    errors = Counter("keras_tandem_http_errors", "HTTP requests that failed, by kind of error.",
                     ["model", "kind"], registry=registry)
    latency = Histogram("keras_tandem_http_request_duration_seconds",
                        "Time from reading a predict request to its response being ready.",
                        ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    for endpoint, code, seconds, kind, model in requests:
        label = model if model in ("m", "other") else default
        counted.labels(label, endpoint, str(code)).inc()
        if seconds is not None:
            latency.labels(label).observe(seconds)
        if kind is not None:
            errors.labels(label, kind).inc()
    return generate_latest(registry).decode()


def _served(requests):
    metrics = ServerMetrics("m")
    for name in ("m", "other"):
        metrics.add_model(name, 16, lambda: (None, None), lambda: [], lambda: 0)
    for endpoint, code, seconds, kind, model in requests:
        metrics.observe(endpoint, code, seconds, kind, model=model)
    return metrics.render().decode()


def _http_lines(text):
    """The lines of the keras_tandem_http_* families, `_created` values masked."""
    lines = [line for line in text.splitlines() if "keras_tandem_http_" in line]
    return [re.sub(r"^(\w+_created\{[^}]*\}) \S+$", r"\1 T", line) for line in lines]


def test_request_metrics_read_as_prometheus_clients_counter_and_histogram():
    t0 = time.time()
    text = _served(REQUESTS)
    t1 = time.time()
    assert _http_lines(text) == _http_lines(_reference(REQUESTS, "m"))
    created = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("keras_tandem_http_") and "_created{" in line]
    assert len(created) == 6 + 3 + 2  # request series, error series, latency series
    assert all(t0 <= t <= t1 for t in created)


def test_created_series_follow_prometheus_clients_switch():
    prometheus_client.disable_created_metrics()
    try:
        text = _served(REQUESTS)
        reference = _reference(REQUESTS, "m")
    finally:
        prometheus_client.enable_created_metrics()
    assert "_created" not in "\n".join(_http_lines(text))
    assert _http_lines(text) == _http_lines(reference)


@pytest.mark.parametrize("seconds, le", [(LATENCY_BUCKETS[0], LATENCY_BUCKETS[0]),
                                         (0.0026, 0.005), (31.0, "+Inf")])
def test_a_latency_counts_in_the_first_bucket_that_holds_it(seconds, le):
    metrics = ServerMetrics("m")
    metrics.observe("predict", 200, seconds, model="m")
    buckets = {m[0]: float(m[1]) for m in re.findall(
        r'keras_tandem_http_request_duration_seconds_bucket\{le="([^"]+)",model="m"\} (\S+)',
        metrics.render().decode())}
    bounds = [*map(str, map(float, LATENCY_BUCKETS)), "+Inf"]
    first = bounds.index(str(float(le)) if le != "+Inf" else le)
    assert [buckets[b] for b in bounds] == [0.0] * first + [1.0] * (len(bounds) - first)


def test_requests_counted_from_many_threads_all_count():
    metrics = ServerMetrics("m")
    per_thread, threads = 2000, 4
    barrier = threading.Barrier(threads)

    def count():
        barrier.wait()
        for _ in range(per_thread):
            metrics.observe("predict", 200, 0.001, "x", model="m")

    workers = [threading.Thread(target=count) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    text = metrics.render().decode()
    total = per_thread * threads
    assert f'keras_tandem_http_requests_total{{code="200",endpoint="predict",model="m"}} ' \
           f'{float(total)}' in text
    assert f'keras_tandem_http_errors_total{{kind="x",model="m"}} {float(total)}' in text
    assert f'keras_tandem_http_request_duration_seconds_count{{model="m"}} {float(total)}' in text
