"""`BatchQueue` and `Request` alone: no TensorFlow, no worker thread."""

import threading
import time
from _thread import allocate_lock
from concurrent.futures import Future

import numpy as np
import pytest

from keras_tandem._batching import BatchQueue, Request
from keras_tandem.errors import Overloaded, PredictorClosed


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
