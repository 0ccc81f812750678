"""The forward pass: the backend seam, the buckets, and the checked use of TensorFlow's private API.

Each private TensorFlow call the fast paths use is broken here in turn (it
raises, disappears, changes its signature or gives wrong answers), as a
TensorFlow release might break it. The Predictor must still build, answer
like `model.predict`, report the slower path in `stats()` and warn once.
When the traced pass itself cannot run a model, the Predictor falls back to
its own copy of the model ("keras copy"), with the same guarantees.
"""

import logging
import os
import subprocess
import sys
import threading
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from _models import mlp
from _zoo import ZOO
from keras_tandem import Predictor
from keras_tandem.server._metrics import BatchSizeHistogram, ServerMetrics
from keras_tandem.serving import _forward, _forward_keras, _tf_private
from keras_tandem.serving._forward_tf import TensorFlowForward
from keras_tandem.serving.specs import bucket_sizes


@pytest.fixture
def model():
    return mlp()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    # Fallback warnings are once per process: each test starts from none given.
    monkeypatch.setattr(_forward, "_WARNED", set())


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and "keras_tandem" in str(w.message)]


def serve_and_check(model, **options):
    """Builds a Predictor, checks its answers against model.predict; returns its stats."""
    x = np.random.default_rng(0).random((5, 8)).astype("float32")
    expected = model.predict(x, verbose=0)
    with Predictor(model, max_batch_size=8, **options) as p:
        np.testing.assert_allclose(p.predict(x), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.predict(x[1]), expected[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p.predict(np.concatenate([x, x])),
                                   np.concatenate([expected, expected]), rtol=1e-5, atol=1e-6)
        return p.stats()


def serve_and_check_warned(model, **options):
    """`serve_and_check`, recording warnings: (its stats, the fallback warnings given)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = serve_and_check(model, **options)
    return stats, fallback_warnings(record)


# --------------------------------------------------------------- the fast path


def test_normal_path_is_a_session_on_the_calling_thread_and_logs_info_once(model, caplog):
    caplog.set_level(logging.INFO, logger="keras_tandem.serving")
    stats, warned = serve_and_check_warned(model)
    assert stats["call_path"] == "session"  # TensorFlow 2.21: the fastest way works
    assert stats["executor"] == "inline"
    assert warned == []
    infos = [r for r in caplog.records
             if r.name == "keras_tandem.serving" and r.levelno == logging.INFO]
    assert len(infos) == 1
    assert "'session'" in infos[0].getMessage() and "inline" in infos[0].getMessage()


def test_the_session_pass_runs_on_the_worker_thread_alone(model):
    # Fed NumPy views of the aligned buffers, run in the calling thread: no
    # other thread of the process takes part in a pass.
    with Predictor(model, max_batch_size=8) as p:
        assert p.stats()["call_path"] == "session"
        ran_on = []
        run = p._forward._calls[1]
        p._forward._calls = {b: (lambda args, run=run: ran_on.append(threading.get_ident())
                                 or run(args)) for b in p._forward._calls}
        p.predict(np.ones(8, np.float32))
        assert ran_on == [p._worker.ident]


def test_xla_compiled_pass_calls_directly_without_a_warning(model):
    stats, warned = serve_and_check_warned(model, jit_compile=True)
    # By design, not a fallback: XLA's function runs on the calling thread already.
    assert (stats["call_path"], stats["executor"]) == ("direct", "default")
    assert warned == []


# ------------------------------------------------------- each private call broken


def eager_ways_only(monkeypatch):
    # The cases below break the eager ways, which only run once the session
    # way is not taken (as on a machine with a GPU).
    monkeypatch.setattr(_tf_private, "CALL_PATHS",
                        tuple(w for w in _tf_private.CALL_PATHS if w != "session"))


def execute_raises(monkeypatch):
    def broken():
        def execute(*args):
            raise RuntimeError("TFE_Py_Execute moved")
        return execute
    monkeypatch.setattr(_tf_private, "_tfe_py_execute", broken)


def execute_answers_wrong(monkeypatch):
    real = _tf_private._tfe_py_execute()

    def wrong():
        def execute(*args):
            return [tf.zeros_like(t) for t in real(*args)]
        return execute
    monkeypatch.setattr(_tf_private, "_tfe_py_execute", wrong)


def call_op_refused(monkeypatch):
    monkeypatch.setattr(_tf_private, "_PARTITIONED_CALL", "KerasTandemNoSuchOp")


def inference_function_missing(monkeypatch):
    def missing(fn):
        raise AttributeError("'ConcreteFunction' object has no attribute '_inference_function'")
    monkeypatch.setattr(_tf_private, "_inference_function", missing)


def inline_executor_refused(monkeypatch):
    monkeypatch.setattr(_tf_private, "_INLINE_EXECUTOR", "KERAS_TANDEM_NO_SUCH_EXECUTOR")


def call_flat_missing(monkeypatch):
    execute_raises(monkeypatch)  # so that the ways above it are refused too

    def missing(fn):
        raise AttributeError("'ConcreteFunction' object has no attribute '_call_flat'")
    monkeypatch.setattr(_tf_private, "_call_flat", missing)


def call_flat_raises(monkeypatch):
    execute_raises(monkeypatch)

    def raising(fn):
        def call_flat(args, captured):
            raise RuntimeError("_call_flat failed")
        return call_flat
    monkeypatch.setattr(_tf_private, "_call_flat", raising)


def call_flat_signature_changed(monkeypatch):
    # As a TensorFlow release might change it: `captured_inputs` keyword-only.
    execute_raises(monkeypatch)
    real = _tf_private._call_flat

    def changed(fn):
        bound = real(fn)

        def call_flat(tensor_inputs, *, captured_inputs):
            return bound(tensor_inputs, captured_inputs)
        return call_flat
    monkeypatch.setattr(_tf_private, "_call_flat", changed)


@pytest.mark.parametrize("breakage, path, executor, refused", [
    (execute_raises, "call flat", "inline", ["call op: RuntimeError", "direct: RuntimeError"]),
    (execute_answers_wrong, "call flat", "inline", ["call op: output 0 differs"]),
    (call_op_refused, "direct", "inline", ["call op: NotFoundError"]),
    (inference_function_missing, "call flat", "inline", ["call op: AttributeError"]),
    (inline_executor_refused, "call op", "default", ["inline executor: NotFoundError"]),
    (call_flat_missing, "function", "inline", ["call flat: AttributeError"]),
    (call_flat_raises, "function", "inline", ["call flat: RuntimeError"]),
    (call_flat_signature_changed, "function", "inline", ["call flat: TypeError"]),
])
def test_a_broken_private_call_falls_back_answers_right_and_warns_once(
        model, monkeypatch, caplog, breakage, path, executor, refused):
    eager_ways_only(monkeypatch)
    breakage(monkeypatch)
    caplog.set_level(logging.INFO, logger="keras_tandem.serving")
    stats, warned = serve_and_check_warned(model)
    again, warned_again = serve_and_check_warned(model)  # a second Predictor: no second warning
    assert (stats["call_path"], stats["executor"]) == (path, executor)
    assert (again["call_path"], again["executor"]) == (path, executor)
    (warning,) = warned + warned_again
    message = str(warning.message)
    assert f"falls back to '{path}'" in message
    for reason in refused:
        assert reason in message
    infos = [r.getMessage() for r in caplog.records
             if r.name == "keras_tandem.serving" and r.levelno == logging.INFO]
    assert len(infos) == 2 and all(f"'{path}'" in m for m in infos)


def test_a_private_call_off_the_chosen_path_is_never_made(model, monkeypatch):
    # The eager ways come after the session: while it works they are not
    # needed, and their breakage costs nothing.
    def missing(fn):
        raise AttributeError("no _call_flat")
    monkeypatch.setattr(_tf_private, "_call_flat", missing)
    execute_raises(monkeypatch)
    stats, warned = serve_and_check_warned(model)
    assert stats["call_path"] == "session"
    assert warned == []


def make_callable_missing(monkeypatch):
    def missing(session, options):
        raise AttributeError("'Session' object has no attribute '_make_callable_from_options'")
    monkeypatch.setattr(_tf_private, "_make_callable", missing)


def session_answers_wrong(monkeypatch):
    real = _tf_private._make_callable

    def wrong(session, options):
        run = real(session, options)
        return lambda *feeds: [np.zeros_like(o) for o in run(*feeds)]
    monkeypatch.setattr(_tf_private, "_make_callable", wrong)


@pytest.mark.parametrize("breakage, refused", [
    (make_callable_missing, "session: AttributeError"),
    (session_answers_wrong, "session: output 0 differs"),
])
def test_a_broken_session_falls_back_to_the_call_op_and_warns_once(
        model, monkeypatch, breakage, refused):
    breakage(monkeypatch)
    stats, warned = serve_and_check_warned(model)
    again, warned_again = serve_and_check_warned(model)
    assert stats["call_path"] == again["call_path"] == "call op"
    (warning,) = warned + warned_again
    assert "falls back to 'call op'" in str(warning.message)
    assert refused in str(warning.message)


def test_a_pass_that_captures_state_keeps_the_call_op_without_a_warning(caplog):
    # A tensor the model's call closes over is captured by the trace: a
    # session cannot be fed it. That is the model's shape, said at INFO.
    offset = tf.constant([[0.5, -0.5]])

    class Offset(keras.layers.Layer):
        def call(self, x):
            return x + offset

    inputs = keras.Input((8,))
    model = keras.Model(inputs, Offset()(keras.layers.Dense(2)(inputs)))
    caplog.set_level(logging.INFO, logger="keras_tandem.serving")
    stats, warned = serve_and_check_warned(model)
    assert (stats["call_path"], warned) == ("call op", [])
    (info,) = [r.getMessage() for r in caplog.records if r.name == "keras_tandem.serving"]
    assert "session: NotForThisGraph: the function captures state" in info


def test_a_visible_gpu_keeps_the_call_op_without_a_warning(model, monkeypatch):
    real = tf.config.list_logical_devices

    def with_a_gpu(kind=None):
        return ["/device:GPU:0"] if kind == "GPU" else real(kind)
    monkeypatch.setattr(tf.config, "list_logical_devices", with_a_gpu)
    stats, warned = serve_and_check_warned(model)
    assert (stats["call_path"], warned) == ("call op", [])


def test_sessions_are_closed_before_the_interpreter_ends(tmp_path):
    # A session callable's finalizer needs TensorFlow's modules: the session
    # is closed at exit while they stand, so nothing is printed on the way out.
    script = tmp_path / "serve.py"
    script.write_text(
        "import numpy as np, keras\n"
        "from keras_tandem import Predictor\n"
        "model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])\n"
        "p = Predictor(model)\n"
        "print(p.stats()['call_path'], p.predict(np.ones(4, np.float32)).shape)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["session", "(2,)"]
    assert "Exception ignored" not in done.stderr


def test_control_flow_model_runs_in_a_session_or_a_call_op_on_the_default_executor(monkeypatch):
    class Branchy(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            y = self.dense(x)
            return tf.cond(tf.reduce_sum(x) > 0, lambda: y * 2.0, lambda: y - 1.0)

    model = Branchy()
    model(np.zeros((1, 8), np.float32))
    stats, warned = serve_and_check_warned(model, input_signature=keras.Input((8,)))
    # A session runs the graph on the calling thread with any control flow.
    assert (stats["call_path"], stats["executor"]) == ("session", "default")
    eager_ways_only(monkeypatch)
    stats, warned_eager = serve_and_check_warned(model, input_signature=keras.Input((8,)))
    assert (stats["call_path"], stats["executor"]) == ("call op", "default")
    warned += warned_eager
    # The model's own control flow, not a change in TensorFlow: said at INFO, no warning.
    assert not warned


# ------------------------------------------------------------ the backend seam


def test_tensorflow_backend_implements_the_forward_pass_interface(model):
    with Predictor(model, max_batch_size=4) as p:
        assert isinstance(p._forward, TensorFlowForward)
        assert isinstance(p._forward, _forward.ForwardPass)


def test_a_backend_with_no_fast_pass_runs_a_keras_copy_and_says_why(model, monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    stats, warned = serve_and_check_warned(model)
    assert stats["call_path"] == "keras copy"
    (warning,) = warned
    assert "no fast forward pass for Keras' 'numpy' backend" in str(warning.message)


# ------------------------------------------- the fallback: a copy of the model


def trace_fails(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("cannot trace this model")
    monkeypatch.setattr(TensorFlowForward, "__init__", refuse)


def test_a_model_the_traced_pass_cannot_run_is_served_by_a_copy_warned_once(
        model, monkeypatch, caplog):
    trace_fails(monkeypatch)
    caplog.set_level(logging.INFO, logger="keras_tandem.serving")
    stats, warned = serve_and_check_warned(model)
    again, warned_again = serve_and_check_warned(model)
    assert stats["call_path"] == again["call_path"] == "keras copy"
    (warning,) = warned + warned_again  # once per process for one reason
    assert "cannot trace this model" in str(warning.message)
    logged = [r for r in caplog.records if r.name == "keras_tandem.serving"]
    assert [r.levelno for r in logged] == [logging.WARNING] * 2  # one per Predictor
    assert all("'keras copy'" in r.getMessage() for r in logged)


def test_a_traced_pass_whose_answers_differ_from_the_model_is_not_used(model, monkeypatch):
    real_run = TensorFlowForward.run
    monkeypatch.setattr(TensorFlowForward, "run",
                        lambda self, bucket: [o + 1.0 for o in real_run(self, bucket)])
    stats, warned = serve_and_check_warned(model)
    assert stats["call_path"] == "keras copy"
    (warning,) = warned
    assert "differs from the model's own" in str(warning.message)


def test_the_copy_keeps_one_weight_version_per_answer(monkeypatch):
    trace_fails(monkeypatch)
    served, newer = mlp(0), mlp(1)
    x = np.random.default_rng(1).random((6, 8)).astype("float32")
    before, after = served.predict(x, verbose=0), newer.predict(x, verbose=0)
    with Predictor(served, max_batch_size=4) as p:
        served.set_weights(newer.get_weights())  # the original changes: answers do not
        got, version = p.predict(x, return_version=True)
        np.testing.assert_allclose(got, before, rtol=1e-5, atol=1e-6)
        assert version == 0
        assert p.update_weights(newer) == 1
        got, version = p.predict(x, return_version=True)  # split in 2 chunks: one version
        np.testing.assert_allclose(got, after, rtol=1e-5, atol=1e-6)
        assert version == 1


def test_the_copy_answers_many_threads(model, monkeypatch):
    trace_fails(monkeypatch)
    x = np.random.default_rng(2).random((8, 8)).astype("float32")
    expected = model.predict(x, verbose=0)
    results = [None] * 8
    with Predictor(model, max_batch_size=8) as p:
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, p.predict(x[i])))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert p.stats()["call_path"] == "keras copy"
    np.testing.assert_allclose(np.stack(results), expected, rtol=1e-5, atol=1e-6)


def test_a_text_model_is_copied_with_its_vocabulary(monkeypatch):
    # A clone has the adapted TextVectorization's layers but not its lookup
    # table: its answers fail the check, and the save-and-load copy is used.
    trace_fails(monkeypatch)
    zoo = ZOO["text_vectorization"]()
    x = zoo.make_inputs(5)
    expected = zoo.model.predict(x, verbose=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Predictor(zoo.model, max_batch_size=8) as p:
            np.testing.assert_allclose(p.predict(x), expected, rtol=1e-5, atol=1e-6)
            assert p._forward.copied_by == "save and load"
    assert "copied by save and load" in str(fallback_warnings(record)[0].message)


@pytest.mark.parametrize("kind", ["dict_outputs", "multi_output", "string_lookup_invert",
                                  "subclassed", "custom_layer_underscore"])
def test_the_copy_returns_what_the_model_returns(kind, monkeypatch):
    trace_fails(monkeypatch)
    zoo = ZOO[kind]()
    x = zoo.make_inputs(3)
    expected = zoo.model.predict(x, verbose=0)
    with Predictor(zoo.model, max_batch_size=4) as p:
        got = p.predict(x)
        assert p.stats()["call_path"] == "keras copy"
    assert type(got) is type(expected)
    for g, e in zip(keras.tree.flatten(got), keras.tree.flatten(expected)):
        if e.dtype.kind == "O":
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_when_nothing_runs_the_model_the_error_says_what_each_way_met(model, monkeypatch):
    trace_fails(monkeypatch)

    def no_copy(model):
        raise TypeError("not serializable")
    monkeypatch.setattr(_forward_keras, "_clone", no_copy)
    monkeypatch.setattr(_forward_keras, "_save_and_load", no_copy)
    with pytest.raises(RuntimeError) as caught:
        Predictor(model, max_batch_size=4)
    message = str(caught.value)
    assert "cannot trace this model" in message
    assert "clone: TypeError: not serializable" in message
    assert "save and load: TypeError: not serializable" in message


def test_no_numpy_deprecation_warnings_from_the_weight_snapshot(model):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Predictor(model, max_batch_size=4) as p:
            p.update_weights(model)
            p.predict(np.ones(8, np.float32))
    ours = [w for w in record if issubclass(w.category, DeprecationWarning)
            and "keras_tandem" in w.filename]
    assert ours == []


# ------------------------------------------------------------------- buckets


@pytest.mark.parametrize("max_batch_size, buckets", [
    (1, [1]),
    (2, [1, 2]),
    (8, [1, 2, 4, 8]),
    (6, [1, 2, 4, 6]),
    (100, [1, 2, 4, 8, 16, 32, 64, 100]),
])
def test_bucket_sizes_end_at_max_batch_size(max_batch_size, buckets):
    assert bucket_sizes(max_batch_size) == buckets


def test_bucket_sizes_refuse_an_empty_batch():
    with pytest.raises(ValueError, match="max_batch_size"):
        bucket_sizes(0)


def test_forward_pass_pads_each_batch_to_its_bucket(model):
    with Predictor(model, max_batch_size=6) as p:
        forward = p._forward
        assert forward.buckets == [1, 2, 4, 6]
        assert [forward.bucket_of[n] for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


class _StatsSource:
    def __init__(self, batches, mean_batch_size):
        self.s = {"batches": batches, "mean_batch_size": mean_batch_size}

    def stats(self):
        return self.s


def test_server_batch_size_histogram_uses_the_forward_pass_buckets():
    assert BatchSizeHistogram(100).bounds == bucket_sizes(100)
    # A full batch of 100 rows falls in the 100 bucket, not one of 128.
    source = _StatsSource(batches=3, mean_batch_size=100.0)
    metrics = ServerMetrics("m", 100, current=lambda: (source, 1), load_failures=lambda: 0)
    text = metrics.render().decode()
    assert 'keras_tandem_batch_size_bucket{le="100",model="m"} 3.0' in text
    assert 'keras_tandem_batch_size_bucket{le="64",model="m"} 0.0' in text
    assert 'le="128"' not in text


def test_a_model_that_samples_at_inference_keeps_the_traced_pass():
    # Its own answers vary from call to call, so they check nothing: the
    # traced pass is kept rather than refused for differing.
    class Noise(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.seeds = keras.random.SeedGenerator(1)

        def call(self, x):
            return x + keras.random.normal(keras.ops.shape(x), seed=self.seeds)

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Noise()(inputs)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with Predictor(model, max_batch_size=4) as p:
            assert p.predict(np.ones(4, np.float32)).shape == (2,)
            assert p.stats()["call_path"] == "session"
    assert fallback_warnings(record) == []
