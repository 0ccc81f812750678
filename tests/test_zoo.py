"""Every model kind of the zoo (`_zoo.py`) served by a Predictor answers as `model.predict`.

For each kind: one example, a batch, and 8 threads at once, each equal to
`model.predict` on the same inputs (rtol 1e-4, or 1e-2 under mixed_float16).
Each model is built and served once for its three checks.
"""

import threading

import keras
import numpy as np
import pytest

from _zoo import ZOO
from keras_tandem import Predictor

ROWS = 8


def _row(batch, i):
    return keras.tree.map_structure(lambda a: a[i], batch)


def assert_same(got, want, rtol):
    """Equal structure and values: numbers to `rtol` of the output's scale, strings exactly."""
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert sorted(got) == sorted(want)
    got_flat, want_flat = keras.tree.flatten(got), keras.tree.flatten(want)
    assert len(got_flat) == len(want_flat)
    for g, w in zip(got_flat, want_flat):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape
        if w.dtype.kind == "O":
            np.testing.assert_array_equal(g, w)
        else:
            scale = float(np.max(np.abs(w), initial=0.0))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(scale, 1e-3))


@pytest.fixture(scope="module", params=sorted(ZOO))
def served(request):
    zoo = ZOO[request.param]()
    with Predictor(zoo.model, max_batch_size=16, input_signature=zoo.input_signature) as p:
        batch = zoo.make_inputs(ROWS)
        want = zoo.model.predict(batch, verbose=0)  # after the Predictor built it, if unbuilt
        yield zoo, p, batch, want


def test_one_example(served):
    zoo, p, batch, want = served
    assert_same(p.predict(_row(batch, 3)), _row(want, 3), zoo.rtol)


def test_a_batch(served):
    zoo, p, batch, want = served
    assert_same(p.predict(batch), want, zoo.rtol)


def test_eight_threads_at_once(served):
    zoo, p, batch, want = served
    errors = []
    start = threading.Barrier(8)

    def caller(i):
        try:
            start.wait(timeout=30)
            for _ in range(3):
                assert_same(p.predict(_row(batch, i)), _row(want, i), zoo.rtol)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert p.stats()["requests"] >= 24
