"""`Predictor.apredict` and `submit(callback=...)`: the asyncio path and its loop bridge."""

import asyncio
import sys
import threading

import keras
import numpy as np
import pytest

from _gated import open_gated_model
from _models import mlp
from _poll import wait_until
from keras_tandem import InvalidInputError, PredictionFailed, Predictor, PredictorClosed


def assert_same_answers(got, expected):
    """Equal answers; on JAX and PyTorch, up to rounding (a batch of 1 and one of 64 differ)."""
    if keras.backend.backend() == "tensorflow":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def reference(model, x):
    return keras.ops.convert_to_numpy(model(np.asarray(x, np.float32), training=False))


@pytest.fixture(scope="module")
def served():
    model = mlp()
    with Predictor(model, max_batch_size=64, timeout_s=30) as p:
        yield model, p


@pytest.fixture
def gated():
    model, gate = open_gated_model()
    p = Predictor(model, max_batch_size=128, timeout_s=30)
    yield p, gate
    gate.set()
    p.close()


def count_wakeups(loop):
    """Counts the loop's `call_soon_threadsafe` calls: its wake-ups from other threads."""
    calls = [0]
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    return calls


def hold_worker(p, gate):
    """Blocks the worker in a forward pass; returns the future of the request holding it."""
    gate.clear()
    blocker = p.submit(np.zeros(3, np.float32))
    wait_until(lambda: p.stats()["queue_depth"] == 0, 20, "the worker never took the request")
    return blocker


def open_when_queued(p, gate, depth):
    """Opens the gate from another thread once `depth` requests wait: no sleep in the loop."""
    def run():
        wait_until(lambda: p.stats()["queue_depth"] >= depth, 20,
                   f"{depth} requests never queued")
        gate.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_many_coroutines_on_one_loop_get_the_answers_of_predict(served):
    model, p = served
    xs = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)

    async def main():
        return await asyncio.gather(*(p.apredict(x) for x in xs))

    answers = asyncio.run(main())
    expected = np.stack([p.predict(x) for x in xs])
    assert_same_answers(np.stack(answers), expected)
    np.testing.assert_allclose(expected, reference(model, xs), rtol=1e-5, atol=1e-6)


def test_the_loop_is_woken_once_per_batch_not_per_request(gated):
    p, gate = gated
    blocker = hold_worker(p, gate)
    batches_before = p.stats()["batches"]

    async def main():
        wakeups = count_wakeups(asyncio.get_running_loop())
        opener = open_when_queued(p, gate, 64)
        answers = await asyncio.gather(
            *(p.apredict(np.full(3, i, np.float32), return_version=True) for i in range(64)))
        opener.join(20)
        return answers, wakeups[0]

    answers, wakeups = asyncio.run(main())
    blocker.result(20)
    loop_batches = p.stats()["batches"] - batches_before - 1  # less the blocker's
    assert len(answers) == 64 and all(y.shape == (2,) and v == 0 for y, v in answers)
    assert 1 <= loop_batches <= 2  # queued while the worker was held: one or two passes
    assert 1 <= wakeups <= loop_batches


def test_two_loops_in_two_threads_each_get_their_own_answers(gated):
    p, gate = gated
    blocker = hold_worker(p, gate)
    results = {}

    def run_loop(name, offset):
        async def main():
            xs = [np.full(3, offset + i, np.float32) for i in range(20)]
            return xs, await asyncio.gather(*(p.apredict(x) for x in xs))

        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=run_loop, args=(n, o)) for n, o in (("a", 0), ("b", 100))]
    for t in threads:
        t.start()
    opener = open_when_queued(p, gate, 40)  # both loops' requests share the next batch
    for t in [*threads, opener]:
        t.join(30)
    blocker.result(20)
    for xs, answers in results.values():
        assert_same_answers(np.stack(answers), np.stack([p.predict(x) for x in xs]))
    assert set(results) == {"a", "b"}


def test_a_cancelled_apredict_is_skipped_and_breaks_nothing(gated):
    p, gate = gated
    blocker = hold_worker(p, gate)
    requests_before = p.stats()["requests"]

    async def main():
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(p.apredict(np.full(3, i, np.float32))) for i in range(10)]
        await loop.run_in_executor(None, wait_until, lambda: p.stats()["queue_depth"] == 10)
        for t in tasks[::2]:
            t.cancel()
        gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    blocker.result(20)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes[::2])
    assert all(isinstance(o, np.ndarray) and o.shape == (2,) for o in outcomes[1::2])
    assert p.stats()["requests"] - requests_before == 1 + 5  # the cancelled never ran
    assert asyncio.run(p.apredict(np.zeros(3, np.float32))).shape == (2,)


def test_requests_of_one_loop_pass_reach_the_worker_as_one_batch():
    model = mlp()
    with Predictor(model, max_batch_size=128, timeout_s=30) as p:
        wait_until(lambda: p.stats()["queue_depth"] == 0, 20, "the warm-up never finished")
        before = p.stats()["batches"]

        async def main():
            loop = asyncio.get_running_loop()
            # No await between the submits: one pass of the loop queues all 64,
            # and the worker is woken once, after the pass.
            futures = [p.submit(np.full(8, i, np.float32), loop=loop) for i in range(64)]
            return await asyncio.gather(*futures)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # a woken worker would take the GIL between two submits
        try:
            answers = asyncio.run(main())
        finally:
            sys.setswitchinterval(interval)
        assert len(answers) == 64
        assert p.stats()["batches"] - before == 1
        np.testing.assert_allclose(np.stack(answers),
                                   reference(model, np.arange(64)[:, None] * np.ones(8)),
                                   rtol=1e-5, atol=1e-6)


def test_deadlines_of_different_timeouts_on_one_loop_each_expire():
    model, gate = open_gated_model()
    with Predictor(model, timeout_s=0.2) as short, Predictor(model, timeout_s=60) as long:
        gate.clear()

        async def main():
            slow = asyncio.ensure_future(long.apredict(np.zeros(3, np.float32)))
            with pytest.raises(TimeoutError, match=r"timeout_s=0\.2"):
                await short.apredict(np.zeros(3, np.float32))
            assert not slow.done()  # the 60 s deadline is not due: still waiting
            gate.set()
            return await slow

        assert asyncio.run(main()).shape == (2,)


def test_apredict_times_out_and_the_predictor_recovers():
    model, gate = open_gated_model()
    with Predictor(model, timeout_s=0.3) as p:
        gate.clear()

        async def main():
            with pytest.raises(TimeoutError, match=r"timeout_s=0\.3"):
                await p.apredict(np.zeros(3, np.float32))
            gate.set()
            return await p.apredict(np.zeros(3, np.float32))

        assert asyncio.run(main()).shape == (2,)
        assert p.stats()["timeouts"] >= 1


def test_invalid_input_raises_at_once_and_queues_nothing(served):
    _, p = served
    invalid_before = p.stats()["invalid_inputs"]

    async def main():
        coroutine = p.apredict(np.zeros(7, np.float32))
        # Raised in the first step, before the coroutine ever waits.
        with pytest.raises(InvalidInputError, match=r"\(8,\)"):
            coroutine.send(None)

    asyncio.run(main())
    assert p.stats()["invalid_inputs"] == invalid_before + 1
    assert p.stats()["queue_depth"] == 0


def test_a_split_apredict_is_answered_by_one_version():
    model = mlp()
    x = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    versions = {0: model.get_weights()}
    with Predictor(model, max_batch_size=4, timeout_s=30) as p:
        stop = threading.Event()

        def swap():
            rng = np.random.default_rng(2)
            while not stop.is_set() and len(versions) < 30:
                new = [w + rng.normal(scale=0.5, size=w.shape).astype(np.float32)
                       for w in versions[0]]
                versions[p.update_weights(new)] = new

        async def main():
            return [await p.apredict(x, return_version=True) for _ in range(30)]

        swapper = threading.Thread(target=swap)
        swapper.start()
        try:
            answers = asyncio.run(main())
        finally:
            stop.set()
            swapper.join(30)
    check = mlp()
    for y, v in answers:
        assert y.shape == (10, 4)
        check.set_weights(versions[v])
        np.testing.assert_allclose(y, reference(check, x), rtol=1e-4, atol=1e-5)


def test_submit_with_a_callback_gets_results_and_errors(gated):
    p, _ = gated
    got = []
    done = threading.Event()

    def callback(result, error):
        got.append((result, error))
        done.set()

    def answer_of(*args, **kwargs):
        done.clear()
        assert p.submit(*args, callback=callback, **kwargs) is None  # no Future made
        assert done.wait(30)
        return got[-1]

    assert answer_of(np.zeros(3, np.float32))[0].shape == (2,)
    (y, version), error = answer_of(np.zeros(3, np.float32), return_version=True)
    assert y.shape == (2,) and version == 0 and error is None
    assert answer_of(np.zeros((300, 3), np.float32))[0].shape == (300, 2)  # three batches
    result, error = answer_of(np.full(3, 666, np.float32))  # the model refuses it
    assert result is None and isinstance(error, PredictionFailed)

    def careless(result, error):
        raise RuntimeError("a careless callback")

    p.submit(np.zeros(3, np.float32), callback=careless)
    assert p.predict(np.zeros(3, np.float32)).shape == (2,)  # the worker went on
    with pytest.raises(InvalidInputError):
        p.submit(np.zeros(5), callback=callback)  # raised here, not through the callback
    with pytest.raises(ValueError, match="not both"):
        p.submit(np.zeros(3), callback=callback, loop=object())
    assert len(got) == 4


def test_close_answers_queued_apredicts_then_refuses(gated):
    p, gate = gated
    blocker = hold_worker(p, gate)

    async def main():
        loop = asyncio.get_running_loop()
        tasks = [asyncio.ensure_future(p.apredict(np.zeros(3, np.float32))) for _ in range(8)]
        await loop.run_in_executor(None, wait_until, lambda: p.stats()["queue_depth"] == 8)
        closer = threading.Thread(target=p.close)
        closer.start()
        await loop.run_in_executor(None, wait_until, lambda: p._closed)
        with pytest.raises(PredictorClosed):
            await p.apredict(np.zeros(3, np.float32))
        gate.set()
        answers = await asyncio.gather(*tasks)
        await loop.run_in_executor(None, closer.join, 20)
        return answers

    answers = asyncio.run(main())
    blocker.result(20)
    assert len(answers) == 8 and all(a.shape == (2,) for a in answers)
