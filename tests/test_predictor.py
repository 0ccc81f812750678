"""Behaviour of `Predictor`: answers, batching, versions, errors, lifecycle."""

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest

from _gated import BACKEND, FAST_PATH, host_call, open_gated_model, tf_only
from _poll import wait_until
from keras_tandem import (
    InvalidInputError,
    Overloaded,
    PredictionFailed,
    Predictor,
    PredictorClosed,
)


def mlp(seed=0, n_in=8, n_out=4):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((n_in,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(n_out),
    ])


class Sub(keras.Model):
    """A subclassed model: Dense(5, tanh) then Dense(2)."""

    def __init__(self):
        super().__init__()
        self.d1 = keras.layers.Dense(5, activation="tanh")
        self.d2 = keras.layers.Dense(2)

    def call(self, x):
        return self.d2(self.d1(x))


def reference(model, x):
    return keras.ops.convert_to_numpy(model(np.asarray(x, np.float32), training=False))


@pytest.fixture
def gated():
    return open_gated_model()


def test_answers_equal_model_from_64_threads():
    model = mlp()
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64 * 20, 8)).astype(np.float32)
    expected = reference(model, xs)
    with Predictor(model, max_batch_size=32) as p:
        def worker(i):
            return [p.predict(xs[j]) for j in range(i, len(xs), 64)]

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(worker, range(64)))
        stats = p.stats()
    for i, answers in enumerate(results):
        np.testing.assert_allclose(np.stack(answers), expected[i::64], rtol=1e-5, atol=1e-5)
    assert stats["requests"] == len(xs)
    assert stats["mean_batch_size"] * stats["batches"] == pytest.approx(len(xs))  # rows
    assert stats["errors"] == 0


def test_requests_that_queue_during_a_pass_share_the_next_passes(gated):
    model, gate = gated
    with Predictor(model, max_batch_size=4, timeout_s=20) as p:
        gate.clear()
        first = p.submit(np.zeros(3, np.float32))
        wait_until(lambda: p.stats()["queue_depth"] == 0, 20,
                   "the worker never took the first request")
        queued = [p.submit(np.full(3, i, np.float32)) for i in range(10)]
        assert p.stats()["queue_depth"] == 10  # the worker is held in its pass
        gate.set()
        for f in [first, *queued]:
            assert f.result(20).shape == (2,)
    stats = p.stats()  # closed: the worker has recorded every batch
    assert stats["requests"] == 11
    assert stats["batches"] == 4  # the first alone, then 4 + 4 + 2 rows


def test_single_example_and_batch_shapes_and_lists():
    model = mlp()
    x = np.linspace(-1, 1, 8, dtype=np.float32)
    with Predictor(model, max_batch_size=4) as p:
        one = p.predict(x)
        assert one.shape == (4,)
        np.testing.assert_allclose(one, reference(model, x[None])[0], rtol=1e-5, atol=1e-6)
        batch = p.predict(np.stack([x, -x, 2 * x]))
        assert batch.shape == (3, 4)
        as_list = p.predict(x.tolist())
        np.testing.assert_allclose(as_list, one, rtol=1e-6)
        as_nested = p.predict([x.tolist(), (-x).tolist()])
        assert as_nested.shape == (2, 4)
        # float64, integers and booleans are cast, as Keras accepts them
        p.predict(x.astype(np.float64))
        p.predict(np.arange(8))
        p.predict(np.ones(8, bool))


def test_batch_larger_than_max_batch_size_is_split_in_order():
    model = mlp()
    xs = np.random.default_rng(1).normal(size=(37, 8)).astype(np.float32)
    with Predictor(model, max_batch_size=8) as p:
        out, version = p.predict(xs, return_version=True)
        fut = p.submit(xs, return_version=True)
        out2, version2 = fut.result(10)
    np.testing.assert_allclose(out, reference(model, xs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out2, out, rtol=1e-6)
    assert version == version2 == 0


def test_multi_input_multi_output_dict_and_list():
    keras.utils.set_random_seed(3)
    a = keras.Input((3,), name="a")
    b = keras.Input((2, 2), name="b")
    h = keras.layers.Concatenate()([a, keras.layers.Flatten()(b)])
    model = keras.Model({"a": a, "b": b},
                        {"score": keras.layers.Dense(1)(h), "probs": keras.layers.Dense(5)(h)})
    xa = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    xb = np.random.default_rng(1).normal(size=(6, 2, 2)).astype(np.float32)
    expected = keras.tree.map_structure(keras.ops.convert_to_numpy,
                                        model({"a": xa, "b": xb}, training=False))
    with Predictor(model, max_batch_size=4) as p:
        out = p.predict({"b": xb, "a": xa})
        one = p.predict({"a": xa[2], "b": xb[2].tolist()})
    assert set(out) == {"score", "probs"}
    assert out["probs"].shape == (6, 5) and one["score"].shape == (1,)
    np.testing.assert_allclose(out["probs"], expected["probs"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["score"], expected["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one["probs"], expected["probs"][2], rtol=1e-5, atol=1e-5)

    model2 = keras.Model([a, b], [keras.layers.Dense(2)(h), keras.layers.Dense(3)(h)])
    with Predictor(model2) as p:
        out = p.predict([xa, xb])
        by_name = p.predict({"a": xa[0], "b": xb[0]})
    assert isinstance(out, list) and [o.shape for o in out] == [(6, 2), (6, 3)]
    expected = [keras.ops.convert_to_numpy(o) for o in model2([xa, xb], training=False)]
    np.testing.assert_allclose(out[1], expected[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(by_name[0], expected[0][0], rtol=1e-5, atol=1e-5)


def test_subclassed_model():
    model = Sub()
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    model(x)
    with Predictor(model) as p:
        np.testing.assert_allclose(p.predict(x), reference(model, x), rtol=1e-5, atol=1e-6)
        assert p.predict(x[0]).shape == (2,)


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (np.zeros(7, np.float32), "(8,)"),                  # wrong shape
        (np.zeros((2, 3, 8), np.float32), "(2, 3, 8)"),     # wrong rank
        (np.zeros((0, 8), np.float32), "empty batch"),
        (["a"] * 8, "strings"),
        (np.zeros(8, complex), "complex"),
        ([[1.0] * 8, [1.0] * 7], "ragged"),
        (None, "None"),
        ([object()] * 8, "objects"),
    ],
)
def test_bad_input_fails_only_its_own_request(bad, fragment):
    model = mlp()
    good = np.ones(8, np.float32)
    with Predictor(model) as p:
        with ThreadPoolExecutor(8) as pool:
            goods = [pool.submit(p.predict, good) for _ in range(16)]
            with pytest.raises(InvalidInputError) as info:
                p.predict(bad)
            answers = [f.result(10) for f in goods]
        assert p.stats()["invalid_inputs"] == 1
    message = str(info.value)
    assert fragment in message
    assert "Input 'input'" in message  # names the input
    assert "(8,)" in message and "float32" in message  # says what was expected
    assert isinstance(info.value, ValueError)
    for a in answers:
        np.testing.assert_allclose(a, reference(model, good[None])[0], rtol=1e-5, atol=1e-6)


def test_bad_named_inputs():
    a = keras.Input((2,), name="a")
    b = keras.Input((2,), name="b")
    model = keras.Model({"a": a, "b": b}, keras.layers.Add()([a, b]))
    with Predictor(model) as p:
        with pytest.raises(InvalidInputError, match=r"Missing input.*'b'"):
            p.predict({"a": [1.0, 2.0]})
        with pytest.raises(InvalidInputError, match=r"Unknown input.*'c'"):
            p.predict({"a": [1.0, 2.0], "b": [1.0, 2.0], "c": [0.0, 0.0]})
        with pytest.raises(InvalidInputError, match="disagree"):
            p.predict({"a": [[1.0, 2.0]], "b": [1.0, 2.0]})
        np.testing.assert_allclose(p.predict({"a": [1.0, 2.0], "b": [3.0, 4.0]}), [4.0, 6.0])


def test_nan_passes_through():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    x = np.ones(8, np.float32)
    x[3] = np.nan
    with Predictor(model) as p:
        assert np.isnan(p.predict(x)).all()  # not rejected: NaN is a valid float


def test_overloaded_at_once_when_queue_full(gated):
    model, gate = gated
    with Predictor(model, max_batch_size=1, queue_size=2, timeout_s=20) as p:
        gate.clear()
        first = p.submit(np.zeros(3))
        # The worker takes the first request and blocks on it.
        wait_until(lambda: p.stats()["queue_depth"] == 0, 20,
                   "the worker never took the first request")
        queued = [p.submit(np.zeros(3)) for _ in range(2)]
        # Raised, not waited for: the queue stays full as long as the gate is shut.
        with pytest.raises(Overloaded, match="queue_size"):
            p.submit(np.zeros(3))
        with pytest.raises(Overloaded):
            p.predict(np.zeros(3))
        assert p.stats()["rejected"] == 2
        gate.set()
        for f in [first, *queued]:
            assert f.result(10).shape == (2,)


def test_deadline_raises_timeout_error_and_predictor_recovers(gated):
    model, gate = gated
    with Predictor(model, timeout_s=0.3) as p:
        gate.clear()
        with pytest.raises(TimeoutError, match=r"timeout_s=0\.3"):
            p.predict(np.zeros(3))
        gate.set()
        assert p.predict(np.zeros(3)).shape == (2,)
        assert p.stats()["timeouts"] == 1


def test_close_answers_every_queued_request(gated):
    model, gate = gated
    p = Predictor(model, max_batch_size=4, timeout_s=20)
    gate.clear()
    futures = [p.submit(np.full(3, i, np.float32)) for i in range(50)]
    closer = threading.Thread(target=p.close)
    closer.start()

    def refused():
        try:
            futures.append(p.submit(np.zeros(3, np.float32)))  # accepted before close
        except PredictorClosed:
            return True
        return False

    wait_until(refused, 20, "close() never started refusing requests")
    with pytest.raises(PredictorClosed):
        p.predict(np.zeros(3))
    gate.set()
    closer.join(20)
    assert not closer.is_alive()
    results = [f.result(0) for f in futures]  # all done already: none lost
    assert all(r.shape == (2,) for r in results)
    p.close()  # idempotent
    with pytest.raises(PredictorClosed):
        p.submit(np.zeros(3))
    with pytest.raises(PredictorClosed):
        p.update_weights(model)


@tf_only
def test_exception_in_forward_fails_only_that_batch():
    import tensorflow as tf

    class Checked(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            tf.debugging.assert_less(x, 100.0, message="value too large")
            return self.dense(x)

    model = Checked()
    model(np.zeros((1, 3), np.float32))
    with Predictor(model) as p:
        with pytest.raises(PredictionFailed) as info:
            p.predict(np.full(3, 1000.0))
        assert isinstance(info.value.__cause__, tf.errors.InvalidArgumentError)
        assert "value too large" in str(info.value)
        assert p.predict(np.ones(3)).shape == (2,)
        assert p.stats()["errors"] == 1


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch runs the model eagerly: no trace")
def test_no_retracing_in_steady_state():
    calls = []

    class Counting(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            calls.append(1)  # Python side effect: runs once per trace
            return self.dense(x)

    model = Counting()
    model(np.zeros((1, 5), np.float32))
    with Predictor(model, max_batch_size=16) as p:
        traces, model_calls = p.stats()["traces"], len(calls)
        assert traces >= 1
        rng = np.random.default_rng(0)
        for n in [1, 2, 3, 5, 8, 13, 16, 40, 7]:
            p.predict(rng.normal(size=(n, 5)))
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda _: p.predict(rng.normal(size=5)), range(200)))
        assert p.stats()["traces"] == traces
        assert len(calls) == model_calls


def test_padding_rows_are_zeros_not_stale():
    seen = []

    class Recording(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            def record(a):
                seen.append(a.copy())
                return a

            return self.dense(host_call(record, x, x))

    model = Recording()
    model(np.zeros((1, 2), np.float32))
    with Predictor(model, max_batch_size=8) as p:
        p.predict(np.full((7, 2), 5.0))
        p.predict(np.full((3, 2), 9.0))
    last = seen[-1]
    assert last.shape == (4, 2)  # bucket of 3 rows is 4
    np.testing.assert_array_equal(last[:3], 9.0)
    np.testing.assert_array_equal(last[3:], 0.0)


def test_answers_of_a_model_that_returns_its_input_are_not_overwritten():
    # The batch buffer is reused for every batch; an answer must never be a
    # view of it, or the next batch would change answers already handed out.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, [inputs, keras.layers.Dense(2)(inputs)])
    with Predictor(model, max_batch_size=4) as p:
        first = p.predict(np.full(3, 1.0, np.float32))
        for value in (2.0, 3.0):
            p.predict(np.full((4, 3), value, np.float32))
        np.testing.assert_array_equal(first[0], np.full(3, 1.0, np.float32))


def test_owns_its_weights_and_update_weights_versions():
    model = mlp()
    x = np.ones(8, np.float32)
    before = reference(model, x[None])[0]
    with Predictor(model) as p:
        assert p.version == 0
        for w in model.weights:
            w.assign(w + 1.0)  # keeps training elsewhere: no effect on answers
        np.testing.assert_allclose(p.predict(x), before, rtol=1e-5, atol=1e-6)
        v = p.update_weights(model)
        assert v == 1 and p.version == 1
        y, version = p.predict(x, return_version=True)
        assert version == 1
        np.testing.assert_allclose(y, reference(model, x[None])[0], rtol=1e-5, atol=1e-5)
        assert p.update_weights([w * 0 for w in model.get_weights()]) == 2
        np.testing.assert_allclose(p.predict(x), np.zeros(4), atol=1e-7)
        with pytest.raises(ValueError, match="arrays"):
            p.update_weights(model.get_weights()[:-1])
        with pytest.raises(ValueError, match="shape"):
            p.update_weights(mlp(n_in=9))
        assert p.version == 2


def test_update_weights_under_concurrent_callers_each_answer_matches_its_version():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(8,)).astype(np.float32)
    versions = {0: [w.copy() for w in model.get_weights()]}
    answers = []
    seen = set()
    stop = threading.Event()
    with Predictor(model, max_batch_size=8) as p:
        def client():
            while not stop.is_set():
                answer = p.predict(x, return_version=True)
                answers.append(answer)
                seen.add(answer[1])

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        rng = np.random.default_rng(1)
        for _ in range(15):
            new = [w + rng.normal(scale=0.5, size=w.shape).astype(np.float32)
                   for w in versions[0]]
            version = p.update_weights(new)
            versions[version] = new
            # Each version answers someone before the next one replaces it.
            wait_until(lambda v=version: v in seen, 20, f"no answer from version {version}")
        stop.set()
        for t in threads:
            t.join(20)
    assert {v for _, v in answers} == set(versions)  # 0 to 15, each with answers
    check = mlp()
    expected = {}
    for v, weights in versions.items():
        check.set_weights(weights)
        expected[v] = reference(check, x[None])[0]
    for y, v in answers:
        np.testing.assert_allclose(y, expected[v], rtol=1e-4, atol=1e-5)


def test_submit_and_apredict():
    model = mlp()
    x = np.ones(8, np.float32)
    with Predictor(model) as p:
        fut = p.submit(x)
        np.testing.assert_allclose(fut.result(10), reference(model, x[None])[0], rtol=1e-5)

        async def many():
            return await asyncio.gather(*(p.apredict(x, return_version=True) for _ in range(20)))

        results = asyncio.run(many())
    assert len(results) == 20 and all(v == 0 for _, v in results)


def test_lone_request_does_not_wait_out_max_delay():
    model = mlp()
    # max_delay is far beyond timeout_s: a request that waited it out would time out.
    with Predictor(model, max_delay_ms=600_000, timeout_s=10) as p:
        for _ in range(3):
            p.predict(np.ones(8))
        assert p.stats()["timeouts"] == 0


def test_rejects_invalid_construction():
    with pytest.raises(ValueError, match="max_batch_size"):
        Predictor(mlp(), max_batch_size=0)
    inp = keras.Input((None, 3))
    seq = keras.Model(inp, keras.layers.Dense(1)(inp))
    with pytest.raises(ValueError, match="input_signature"):
        Predictor(seq)
    with Predictor(seq, input_signature=keras.Input((4, 3))) as p:
        assert p.predict(np.zeros((4, 3))).shape == (4, 1)


@tf_only
def test_jit_compile_is_opt_in_and_traces_each_bucket_once():
    model = mlp()
    xs = np.random.default_rng(0).normal(size=(11, 8)).astype(np.float32)
    with Predictor(model, max_batch_size=8, jit_compile=True) as p:
        traces = p.stats()["traces"]
        assert traces == 4  # buckets 1, 2, 4, 8, all traced at construction
        np.testing.assert_allclose(p.predict(xs), reference(model, xs), rtol=1e-4, atol=1e-5)
        assert p.stats()["traces"] == traces
    with Predictor(model, max_batch_size=8) as p:
        assert p.stats()["traces"] == 1  # without XLA: one shape-polymorphic trace


def test_model_with_control_flow():
    class Branchy(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            y = self.dense(x)
            ops = keras.ops
            y = ops.cond(ops.sum(x) > 0, lambda: y * 2.0, lambda: y - 1.0)
            _, y = ops.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y + 1.0), (0, y))
            return y

    model = Branchy()
    model(np.zeros((1, 4), np.float32))
    with Predictor(model, input_signature=keras.Input((4,))) as p:
        for x in (np.ones((2, 4)), -np.ones((2, 4))):
            np.testing.assert_allclose(p.predict(x), reference(model, x), rtol=1e-5, atol=1e-5)



# ------------------------------------------------------------ strings, building


def text_model():
    keras.utils.set_random_seed(0)
    vectorize = keras.layers.TextVectorization(max_tokens=12, output_sequence_length=4)
    vectorize.adapt(np.array(["the cat sat", "on the mat", "a dog ran far"]))
    text = keras.Input((), dtype="string", name="text")
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(12, 4)(vectorize(text)))
    return keras.Model(text, keras.layers.Dense(2)(x))


@tf_only
def test_string_requests_answer_as_model_predict():
    model = text_model()
    texts = ["the cat", "a dog ran", "", "unknown words here", "mat"]
    expected = model.predict(np.array(texts, dtype=object), verbose=0)
    with Predictor(model, max_batch_size=4) as p:  # 5 rows: two chunks
        np.testing.assert_allclose(p.predict(texts), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.predict(np.array(texts)), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.predict([t.encode() for t in texts]), expected,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.predict("a dog ran"), expected[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.predict(b"a dog ran"), expected[1], rtol=1e-5, atol=1e-6)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(p.predict, texts * 4))
        np.testing.assert_allclose(np.stack(answers), np.concatenate([expected] * 4),
                                   rtol=1e-5, atol=1e-6)
        # Its vocabulary is a lookup table the pass captures, which a session
        # cannot be fed: the eager call op, the next fastest way, runs it.
        assert p.stats()["call_path"] == "call op"


@tf_only
def test_a_number_for_a_string_input_fails_only_its_own_request():
    with Predictor(text_model()) as p:
        with pytest.raises(InvalidInputError) as info:
            p.predict(np.array([1, 2]))
        assert p.predict("the cat").shape == (2,)
        assert p.stats()["invalid_inputs"] == 1
    message = str(info.value)
    assert "Input 'text'" in message and "int64" in message
    assert "strings (str or bytes)" in message


@tf_only
def test_string_batches_are_padded_with_empty_strings():
    import tensorflow as tf

    seen = []

    class Recording(keras.layers.Layer):
        def call(self, x):
            def record(a):
                seen.append(a.copy())
                return a
            y = tf.numpy_function(record, [x], tf.string, stateful=True)
            y.set_shape(x.shape)
            return tf.strings.length(y)

    text = keras.Input((), dtype="string")
    model = keras.Model(text, Recording()(text))
    with Predictor(model, max_batch_size=8) as p:
        p.predict(["seven"] * 7)
        np.testing.assert_array_equal(p.predict(["abc", "de", "f"]), [3, 2, 1])
    last = seen[-1]
    assert list(last) == [b"abc", b"de", b"f", b""]  # bucket of 3 rows is 4


def test_a_subclassed_model_never_called_is_built_from_input_signature():
    model = Sub()
    assert not model.built
    with Predictor(model, max_batch_size=4, input_signature=keras.Input((10,))) as p:
        assert model.built
        x = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)
        np.testing.assert_allclose(p.predict(x), reference(model, x), rtol=1e-5, atol=1e-6)
        assert p.stats()["call_path"] == FAST_PATH


def test_a_wrong_input_signature_for_an_unbuilt_model_says_what_to_do():
    model = keras.Sequential([keras.layers.Dense(2), keras.layers.Reshape((3,))])
    with pytest.raises(ValueError, match="input_signature"):
        Predictor(model, input_signature=keras.Input((4,)))


def test_a_layer_class_named_with_an_underscore_runs_on_the_fast_path():
    class _Scale(keras.layers.Layer):  # TensorFlow refuses '__scale' as a root scope
        def build(self, input_shape):
            self.factor = self.add_weight(shape=(), initializer="ones")

        def call(self, x):
            return x * self.factor

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(_Scale()(inputs)))
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    with Predictor(model, max_batch_size=4) as p:
        np.testing.assert_allclose(p.predict(x), reference(model, x), rtol=1e-5, atol=1e-6)
        assert p.stats()["call_path"] == FAST_PATH


def test_a_plain_model_is_served_by_the_backends_fast_pass():
    model = mlp()
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with Predictor(model, max_batch_size=8) as p:
        np.testing.assert_allclose(p.predict(x), reference(model, x), rtol=1e-5, atol=1e-6)
        stats = p.stats()
    assert stats["call_path"] == FAST_PATH
    if BACKEND == "torch":  # Keras' Python per layer recorded away, one graph per bucket
        assert stats["executor"] == "torchscript" and stats["traces"] == 4
    if BACKEND == "jax":  # one compile per bucket: 1, 2, 4, 8
        assert stats["traces"] == 4


@pytest.mark.skipif(not os.path.exists("/proc/self/task"),
                    reason="per-thread CPU time is read from Linux's /proc")
def test_stats_report_the_worker_threads_cpu_time():
    p = Predictor(mlp())
    try:
        before = p.stats()["worker_cpu_s"]
        for _ in range(50):
            p.predict(np.ones(8, "float32"))
        after = p.stats()["worker_cpu_s"]
        assert 0 < before < after  # it traced and warmed up, then ran 50 passes
    finally:
        p.close()
    wait_until(lambda: p.stats()["worker_cpu_s"] is None,
               message="the worker's CPU time is still reported after close()")
