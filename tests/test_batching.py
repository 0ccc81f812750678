"""`BatchQueue` and `Request` alone: no TensorFlow, no worker thread."""

import threading
import time
from _thread import allocate_lock
from concurrent.futures import Future

import numpy as np
import pytest

from keras_tandem.errors import Overloaded, PredictorClosed
from keras_tandem.serving._batching import BatchQueue, Request


def request(rows=1, future=None):
    waiter = None
    if future is None:
        waiter = allocate_lock()
        waiter.acquire()
    return Request((np.zeros((rows, 2)),), rows, rows == 1, waiter, future, time.time() + 60)


def test_take_returns_everything_queued_up_to_max_rows_in_fifo_order():
    q = BatchQueue(capacity=100, max_rows=5, max_delay_s=0)
    reqs = [request(rows) for rows in (1, 2, 1, 3, 1)]
    for r in reqs:
        q.put(r)
    first = q.take()
    assert first == reqs[:3]  # 1 + 2 + 1 rows; the 3-row request would overflow 5
    assert q.take() == reqs[3:]
    assert len(q) == 0


def test_full_queue_raises_overloaded_at_once_and_counts():
    q = BatchQueue(capacity=2, max_rows=8, max_delay_s=0)
    q.put(request())
    q.put(request())
    with pytest.raises(Overloaded, match="queue_size"):
        q.put(request())
    with pytest.raises(Overloaded):
        q.put_all([request(), request()])
    assert q.rejected == 2 and len(q) == 2


def test_close_refuses_new_but_drains_queued():
    q = BatchQueue(capacity=10, max_rows=8, max_delay_s=0)
    r = request()
    q.put(r)
    q.close()
    with pytest.raises(PredictorClosed):
        q.put(request())
    assert q.take() == [r]
    assert q.take() is None


def test_take_blocks_until_put_and_wake_returns_empty():
    q = BatchQueue(capacity=10, max_rows=8, max_delay_s=0)
    got = []
    t = threading.Thread(target=lambda: got.append(q.take()))
    t.start()
    time.sleep(0.05)
    assert not got  # still waiting: nothing queued
    r = request()
    q.put(r)
    t.join(5)
    assert got == [[r]]
    q.wake()
    assert q.take() == []


def test_idle_take_does_not_wait_but_a_busy_one_waits_for_the_expected_rows():
    q = BatchQueue(capacity=10, max_rows=8, max_delay_s=5.0)
    q.put(request())
    t = time.monotonic()
    assert len(q.take()) == 1  # idle: runs at once
    assert time.monotonic() - t < 2.0
    q.put(request())
    threading.Timer(0.05, lambda: q.put(request())).start()
    t = time.monotonic()
    batch = q.take(expect_rows=2)  # waits for the second request, not for 8 rows
    assert len(batch) == 2
    assert time.monotonic() - t < 2.0


def test_busy_take_waits_at_most_max_delay():
    q = BatchQueue(capacity=10, max_rows=8, max_delay_s=0.2)
    q.put(request())
    t = time.monotonic()
    assert len(q.take(expect_rows=4)) == 1
    assert 0.15 < time.monotonic() - t < 5.0


def test_request_finish_and_fail_reach_future_and_waiter():
    f = Future()
    r = request(future=f)
    r.with_version = True
    r.finish("answer", 3)
    assert f.result(0) == ("answer", 3)
    r2 = request()
    r2.fail(ValueError("boom"))
    assert r2.waiter.acquire(False) and isinstance(r2.error, ValueError)


def _steady_stream(q, threads, period_s, stop):
    """`threads` callers, each putting one request every `period_s`, staggered."""

    def caller(i):
        time.sleep(i * period_s / threads)
        while not stop.is_set():
            q.put(request())
            time.sleep(period_s)

    workers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    return workers


def test_a_steady_stream_from_several_threads_is_batched_up_to_max_delay():
    # 4 threads, one request each every 40 ms: a request about every 10 ms.
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=0.1)
    stop = threading.Event()
    callers = _steady_stream(q, 4, 0.04, stop)
    sizes, waits = [], []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        batch = q.take()
        sizes.append(len(batch))
        waits.append(time.perf_counter() - batch[0].enqueued)
    stop.set()
    for c in callers:
        c.join(5)
    late = sizes[len(sizes) // 3:]  # once the rate is measured
    assert sum(late) / len(late) >= 2.5  # without the wait, each batch would be 1 request
    assert max(waits) < 0.1 + 0.05  # never much past max_delay


def test_a_lone_caller_never_waits_for_itself():
    q = BatchQueue(capacity=100, max_rows=64, max_delay_s=0.5)
    t = time.monotonic()
    for _ in range(30):  # closed loop: put, take, put, take... at a high rate
        q.put(request())
        assert len(q.take()) == 1
    assert time.monotonic() - t < 0.5  # waits of max_delay would take seconds


def test_after_a_stream_pauses_the_next_request_runs_at_once():
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=0.2)
    stop = threading.Event()
    callers = _steady_stream(q, 4, 0.02, stop)
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        q.take()
    stop.set()
    for c in callers:
        c.join(5)
    while len(q):
        q.take()
    time.sleep(0.3)  # quiet: longer than max_delay
    q.put(request())
    t = time.monotonic()
    assert len(q.take()) == 1
    assert time.monotonic() - t < 0.1


def _drain_until(q, deadline):
    while time.monotonic() < deadline:
        if len(q):
            q.take()
        else:
            time.sleep(0.001)


def test_a_request_soon_after_the_stream_stops_runs_at_once():
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=2.0)
    stop = threading.Event()
    callers = _steady_stream(q, 4, 0.04, stop)
    _drain_until(q, time.monotonic() + 0.5)
    stop.set()
    for c in callers:
        c.join(5)
    time.sleep(0.04)  # a pause of four gaps: the other callers still count as active
    q.put(request())
    t = time.monotonic()
    assert len(q.take()) >= 1
    # No wait at all: not max_delay (2 s), nor the patience (~50 ms) a stream gets.
    assert time.monotonic() - t < 0.03


def test_a_wait_for_a_stream_ends_soon_after_the_stream_stops():
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=2.0)
    stop = threading.Event()
    callers = _steady_stream(q, 4, 0.04, stop)
    sizes = []

    def worker():
        while (batch := q.take()) is not None:
            sizes.append(len(batch))

    w = threading.Thread(target=worker, daemon=True)
    w.start()
    time.sleep(0.6)
    stop.set()
    for c in callers:
        c.join(5)
    time.sleep(0.5)
    # Requests stay queued while the worker waits: none may still wait out max_delay (2 s).
    assert len(q) == 0
    assert max(sizes) > 1  # and it did batch the stream meanwhile
    q.close()
    w.join(5)
    assert not w.is_alive()
