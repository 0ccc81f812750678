"""`BatchQueue` and `Request` alone: no TensorFlow, no worker thread.

The wait rules run on a `FakeClock`: virtual time, with the arrivals of other
callers scripted on it, so every test asserts which requests a batch holds and
at what virtual time it was handed out, whatever the load on the machine.
"""

import heapq
import itertools
import threading
from _thread import allocate_lock
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from _poll import wait_until
from keras_tandem.errors import Overloaded, PredictorClosed
from keras_tandem.serving._batching import BatchQueue, Request

GAP = 0.001  # the steady stream's time between requests
T0 = 100.0


class FakeClock:
    """Virtual time for a `BatchQueue`, with other callers' work scripted on it.

    `at(t, action)` schedules `action` (another caller's put, a `wake`...) at
    virtual time `t`. A timed wait of the queue runs the next action due
    before it would time out, with the queue's lock released as a real wait
    releases it, and returns at that time; if none is due, it returns at
    once with time moved to its end. An untimed wait (an idle worker) runs
    the next action, or else blocks for real until a thread notifies it.
    """

    def __init__(self, t=T0):
        self.t = t
        self.waits = []  # (virtual time, timeout) of every wait of the queue
        self.blocked = threading.Event()  # an untimed wait is blocking for real
        self._events = []
        self._order = itertools.count()

    def now(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds

    def at(self, t, action):
        heapq.heappush(self._events, (t, next(self._order), action))

    def wait(self, condition, timeout):
        self.waits.append((self.t, timeout))
        if len(self.waits) > 1000:
            raise AssertionError("the queue keeps waiting: a wait loop that never ends")
        if self._events and (timeout is None or self._events[0][0] <= self.t + timeout):
            t, _, action = heapq.heappop(self._events)
            self.t = max(self.t, t)
            condition.release()
            try:
                action()
            finally:
                condition.acquire()
            return True
        if timeout is None:
            self.blocked.set()
            if not threading.Condition.wait(condition, 10):
                raise AssertionError("an idle take was never woken")
            self.blocked.clear()
            return True
        self.t += max(timeout, 0.0)
        return False


def request(rows=1, future=None):
    waiter = None
    if future is None:
        waiter = allocate_lock()
        waiter.acquire()
    return Request((np.zeros((rows, 2)),), rows, rows == 1, waiter, future, T0 + 60)


@pytest.fixture
def callers():
    """Four caller threads: the queue tells callers apart by their thread."""
    pools = [ThreadPoolExecutor(1) for _ in range(4)]
    yield pools
    for p in pools:
        p.shutdown()


def put_from(caller, q, rows=1):
    """`q.put` of a new request on `caller`'s thread; returns the request."""
    r = request(rows)
    caller.submit(q.put, r).result(10)
    return r


def steady_stream(q, clock, callers, n=40):
    """`n` requests, one every GAP of virtual time, from `callers` in turn."""
    sent = []
    for i in range(n):
        clock.advance(GAP)
        sent.append(put_from(callers[i % len(callers)], q))
    return sent


def busy_queue(clock, callers, max_delay_s=0.02):
    """A queue that measured a steady stream from `callers` and has drained it."""
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=max_delay_s, clock=clock)
    sent = steady_stream(q, clock, callers)
    assert q.take() == sent
    clock.waits.clear()
    return q


# ------------------------------------------------------------ FIFO, capacity


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


def test_request_finish_and_fail_reach_future_and_waiter():
    f = Future()
    r = request(future=f)
    r.with_version = True
    r.finish("answer", 3)
    assert f.result(0) == ("answer", 3)
    r2 = request()
    r2.fail(ValueError("boom"))
    assert r2.waiter.acquire(False) and isinstance(r2.error, ValueError)


# ----------------------------------------------------------- the idle worker


@pytest.mark.parametrize("end", ["put", "wake", "close"])
def test_an_idle_take_blocks_until_a_put_wake_or_close_from_another_thread(end):
    clock = FakeClock()
    q = BatchQueue(capacity=10, max_rows=8, max_delay_s=0.005, clock=clock)
    got = []
    worker = threading.Thread(target=lambda: got.append(q.take()))
    worker.start()
    wait_until(clock.blocked.is_set, 30, "take() never waited on an empty queue")
    assert not got
    r = request()
    {"put": lambda: q.put(r), "wake": q.wake, "close": q.close}[end]()
    worker.join(30)
    assert not worker.is_alive()
    assert got == [{"put": [r], "wake": [], "close": None}[end]]
    assert clock.t == T0  # the idle wait is untimed: no virtual time went by


def test_with_the_real_clock_a_put_ends_a_wait_for_rows_long_before_max_delay():
    q = BatchQueue(capacity=10, max_rows=8, max_delay_s=60.0)
    first, second = request(), request()
    q.put(first)
    got = []
    worker = threading.Thread(target=lambda: got.append(q.take(expect_rows=2)))
    worker.start()
    q.put(second)  # whether the worker waits already or not, it takes both
    worker.join(30)  # half of max_delay: only a put that wakes the wait gets here
    assert got == [[first, second]]


# --------------------------------------------------------------- wait rules


def test_requests_queued_during_a_pass_are_taken_together_without_a_wait(callers):
    clock = FakeClock()
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=0.02, clock=clock)
    sent = steady_stream(q, clock, callers, n=40)
    assert q.take() == sent  # all of them, at once
    assert clock.waits == []
    more = steady_stream(q, clock, callers, n=70)
    assert q.take() == more[:64] and q.take() == more[64:]  # max_rows per batch


def test_a_busy_take_waits_for_as_many_rows_as_the_last_batch():
    clock = FakeClock()
    q = BatchQueue(capacity=100, max_rows=64, max_delay_s=0.005, clock=clock)
    first = request()
    q.put(first)
    later = [request() for _ in range(3)]
    for i, r in enumerate(later, 1):
        clock.at(T0 + i * GAP, lambda r=r: q.put(r))
    assert q.take(expect_rows=3) == [first, *later[:2]]
    assert clock.t == pytest.approx(T0 + 2 * GAP)  # as soon as the third row came


def test_a_busy_take_waits_at_most_max_delay_from_the_oldest_request():
    clock = FakeClock()
    q = BatchQueue(capacity=100, max_rows=64, max_delay_s=0.005, clock=clock)
    first, second, late = request(), request(), request()
    q.put(first)
    clock.advance(0.002)  # the worker comes back from a pass 2 ms later
    clock.at(T0 + 0.003, lambda: q.put(second))
    clock.at(T0 + 0.006, lambda: q.put(late))  # past the oldest one's max_delay
    assert q.take(expect_rows=4) == [first, second]
    assert clock.t == pytest.approx(T0 + 0.005)
    assert q.take() == [late]


def test_a_steady_stream_from_other_threads_is_waited_for(callers):
    clock = FakeClock()
    q = busy_queue(clock, callers)
    clock.advance(GAP)
    t = clock.t
    first = put_from(callers[0], q)
    later = []
    # The three other callers each send one in the next three gaps; then the
    # first caller again, whom the batch does not wait for (it has one queued).
    for i, c in enumerate([*callers[1:], callers[0]], 1):
        clock.at(t + i * GAP, lambda c=c: later.append(put_from(c, q)))
    batch = q.take()
    assert batch == [first, *later[:3]]
    assert clock.t == pytest.approx(t + 3 * GAP)


def test_a_lone_caller_never_waits_for_itself():
    clock = FakeClock()
    q = BatchQueue(capacity=1000, max_rows=64, max_delay_s=0.02, clock=clock)
    for _ in range(40):  # a closed loop at a steady rate, all from this thread
        clock.advance(GAP)
        r = request()
        q.put(r)
        assert q.take() == [r]
    clock.advance(GAP)
    last = request()
    q.put(last)
    clock.at(clock.t + GAP, lambda: q.put(request()))  # it would come, but from itself
    assert q.take() == [last]
    assert clock.waits == []


def assert_taken_without_waiting(clock, q, callers, first):
    """With the other callers due one gap apart from now, a take gives [first] at once."""
    t = clock.t
    for i, c in enumerate(callers[1:], 1):
        clock.at(t + i * GAP, lambda c=c: put_from(c, q))
    assert q.take() == [first]
    assert clock.waits == [] and clock.t == t


def test_no_wait_for_a_request_that_came_after_a_pause(callers):
    clock = FakeClock()
    q = busy_queue(clock, callers)
    clock.advance(10 * GAP)  # a pause; the other callers still count as active
    first = put_from(callers[0], q)  # a put takes no virtual time
    assert_taken_without_waiting(clock, q, callers, first)


def test_no_wait_when_the_stream_went_quiet_before_the_take(callers):
    clock = FakeClock()
    q = busy_queue(clock, callers)
    clock.advance(GAP)
    first = put_from(callers[0], q)  # on time: the stream was steady
    clock.advance(3 * GAP)  # but nothing came while the worker ran its last pass
    assert_taken_without_waiting(clock, q, callers, first)


def test_no_wait_for_a_stream_when_a_pass_takes_longer_than_the_gap(callers):
    clock = FakeClock()
    q = busy_queue(clock, callers)
    for _ in range(8):
        q.note_pass(4 * GAP)  # requests pile up during a pass by themselves
    clock.advance(GAP)
    t = clock.t
    first = put_from(callers[0], q)
    for i, c in enumerate(callers[1:], 1):
        clock.at(t + i * GAP, lambda c=c: put_from(c, q))
    assert q.take() == [first]
    assert clock.waits == []


def test_a_wait_for_a_stream_gives_up_three_gaps_after_the_missing_rows_were_due(callers):
    clock = FakeClock()
    q = busy_queue(clock, callers, max_delay_s=0.02)
    clock.advance(GAP)
    t = clock.t
    first = put_from(callers[0], q)
    later = []
    clock.at(t + GAP, lambda: later.append(put_from(callers[1], q)))
    clock.at(t + 0.015, lambda: later.append(put_from(callers[2], q)))  # the stream stopped
    assert q.take() == [first, *later]
    assert len(later) == 1
    # The two missing rows were due one and two gaps after the last arrival:
    # three of the stream's gaps after that, long before max_delay.
    assert t + GAP + 4.5 * GAP < clock.t < t + GAP + 6 * GAP


def test_a_wait_for_a_steady_stream_wakes_only_when_its_rows_are_in():
    # Twelve callers, one request every gap: eleven more rows are due over
    # eleven gaps. While the stream keeps its pace no timed wait is set to
    # end before the last of them is due (the worker would wake to check on
    # the stream every few gaps, a context switch each).
    pools = [ThreadPoolExecutor(1) for _ in range(12)]
    try:
        clock = FakeClock()
        q = busy_queue(clock, pools)
        clock.advance(GAP)
        t = clock.t
        first = put_from(pools[0], q)
        for i, c in enumerate(pools[1:], 1):
            clock.at(t + i * GAP, lambda c=c: put_from(c, q))
        batch = q.take()
    finally:
        for p in pools:
            p.shutdown()
    assert batch[0] is first and len(batch) == 12
    assert clock.waits and all(start + timeout >= t + 11 * GAP for start, timeout in clock.waits)


@pytest.mark.parametrize("end", ["wake", "close"])
def test_wake_and_close_end_a_wait_for_rows_at_once(end):
    clock = FakeClock()
    q = BatchQueue(capacity=100, max_rows=64, max_delay_s=0.005, clock=clock)
    first = request()
    q.put(first)
    clock.at(T0 + GAP, getattr(q, end))
    assert q.take(expect_rows=4) == [first]
    assert clock.t == pytest.approx(T0 + GAP)
    if end == "close":
        assert q.take() is None
    else:
        later = request()
        q.put(later)
        assert q.take() == [later]  # the wake was used up: no empty batch after it
