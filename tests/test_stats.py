"""`ServingStats`: batches recorded cheaply by the worker, folded in bulk, never lost."""

import threading

import numpy as np
import pytest

from keras_tandem.serving import _stats
from keras_tandem.serving._stats import ServingStats
from keras_tandem.serving.specs import QUEUE_WAIT_BOUNDS


def record(stats, waits, latency_after_start=0.002, start=1000.0):
    """One batch whose requests waited `waits` seconds before it started."""
    waits = np.asarray(waits, float)
    stats.record_batch(len(waits), len(waits), done=start + latency_after_start, start=start,
                       enqueued=list(start - waits))


def test_a_batch_is_in_the_next_snapshot_before_any_fold():
    stats = ServingStats()
    record(stats, [0.001, 0.003])
    snap = stats.snapshot()
    assert (snap["requests"], snap["batches"]) == (2, 1)
    assert sum(snap["queue_wait_counts"]) == 2
    assert snap["queue_wait_seconds"] == pytest.approx(0.004)
    assert snap["p99_latency_ms"] == pytest.approx(4.98, abs=0.01)  # 3 ms waited + 2 ms pass


def test_pending_batches_are_folded_in_bulk_without_a_reader():
    stats = ServingStats()
    for _ in range(3 * _stats._FOLD_BATCHES + 5):
        record(stats, [0.001])
    assert len(stats._pending) < _stats._FOLD_BATCHES
    assert int(stats.queue_wait_counts.sum()) == 3 * _stats._FOLD_BATCHES


def test_the_latency_window_keeps_the_newest_requests():
    stats = ServingStats(window=4)
    record(stats, [1.0] * 6)  # old and slow: pushed out of the window
    record(stats, [0.0] * 4)  # the newest four: 2 ms each
    snap = stats.snapshot()
    assert snap["p50_latency_ms"] == pytest.approx(2.0)
    assert snap["p99_latency_ms"] == pytest.approx(2.0)
    assert snap["requests"] == 10 and sum(snap["queue_wait_counts"]) == 10


def test_waits_land_in_their_bucket_across_folds():
    stats = ServingStats()
    waits = [0.0, QUEUE_WAIT_BOUNDS[0], 0.003, 99.0]
    for _ in range(_stats._FOLD_BATCHES + 1):  # one fold by the writer, one by the snapshot
        record(stats, waits)
    counts = stats.snapshot()["queue_wait_counts"]
    n = _stats._FOLD_BATCHES + 1
    assert counts[0] == 2 * n
    assert counts[QUEUE_WAIT_BOUNDS.index(0.005)] == n
    assert counts[-1] == n and sum(counts) == 4 * n


def test_snapshots_from_another_thread_lose_no_batch():
    stats = ServingStats()
    done = threading.Event()

    def read():
        while not done.is_set():
            stats.snapshot()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(20 * _stats._FOLD_BATCHES):
            record(stats, [0.001, 0.002])
    finally:
        done.set()
        reader.join(timeout=60)
    snap = stats.snapshot()
    assert snap["requests"] == sum(snap["queue_wait_counts"]) == 40 * _stats._FOLD_BATCHES
    assert snap["queue_wait_seconds"] == pytest.approx(0.003 * 20 * _stats._FOLD_BATCHES)
