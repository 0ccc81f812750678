"""make_pipeline gives the elements a plain loop gives; probe_input tells input-bound apart."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_tandem import make_pipeline, probe_input


def _preprocess(x, y):
    return tf.sqrt(x) * 2.0 + 1.0, y + 10


def _rows(dataset):
    """Flattens a dataset of (x, y) batches into a list of (x row, y) pairs."""
    out = []
    for xb, yb in dataset:
        out.extend(zip(xb.numpy().tolist(), yb.numpy().tolist()))
    return out


def _loop(xs, ys):
    return [(np.asarray(a).tolist(), int(b)) for a, b in
            (tuple(t.numpy() for t in _preprocess(tf.constant(x), tf.constant(y)))
             for x, y in zip(xs, ys))]


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return rng.random((23, 3), dtype=np.float32), np.arange(23, dtype=np.int64)


@pytest.mark.parametrize("vectorized", [False, True])
def test_arrays_give_the_same_elements_as_a_loop(arrays, vectorized):
    x, y = arrays
    ds = make_pipeline((x, y), preprocess=_preprocess, batch_size=5, vectorized=vectorized,
                       deterministic=True)
    sizes = [int(b[1].shape[0]) for b in ds]
    assert sizes == [5, 5, 5, 5, 3]
    got = _rows(ds)
    want = _loop(x, y)
    assert [g[1] for g in got] == [w[1] for w in want]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)
    assert ds.options().deterministic is True


def test_npy_files_give_the_same_elements_as_a_loop(tmp_path, arrays):
    x, y = arrays
    for i in range(len(x)):
        np.save(tmp_path / f"ex{i:03d}.npy", x[i])
        (tmp_path / f"ex{i:03d}.label").write_text(str(y[i]))

    def decode(path):
        row = tf.numpy_function(lambda p: np.load(p.decode()), [path], tf.float32)
        row.set_shape((3,))
        label_path = tf.strings.regex_replace(path, r"\.npy$", ".label")
        label = tf.strings.to_number(tf.io.read_file(label_path), tf.int64)
        return row, label

    ds = make_pipeline(str(tmp_path / "*.npy"), decode=decode, preprocess=_preprocess,
                       batch_size=4, deterministic=True, drop_remainder=True)
    got = _rows(ds)
    want = _loop(x, y)[:20]  # 23 files, drop_remainder: 5 batches of 4
    assert [g[1] for g in got] == [w[1] for w in want]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)


def test_tfrecord_files_give_the_same_elements_as_a_loop(tmp_path, arrays):
    x, y = arrays
    for shard, rows in enumerate(np.array_split(np.arange(len(x)), 3)):
        with tf.io.TFRecordWriter(str(tmp_path / f"part-{shard}.tfrecord")) as w:
            for i in rows:
                ex = tf.train.Example(features=tf.train.Features(feature={
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x[i])),
                    "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[y[i]])),
                }))
                w.write(ex.SerializeToString())
    spec = {"x": tf.io.FixedLenFeature((3,), tf.float32),
            "y": tf.io.FixedLenFeature((), tf.int64)}

    def decode(record):
        ex = tf.io.parse_single_example(record, spec)
        return ex["x"], ex["y"]

    ds = make_pipeline([str(tmp_path / "part-*.tfrecord")], reader="tfrecord", decode=decode,
                       preprocess=_preprocess, batch_size=6, deterministic=True)
    # Records of several files are interleaved: same elements, in another order.
    got = sorted(_rows(ds), key=lambda r: r[1])
    want = _loop(x, y)
    assert [g[1] for g in got] == [w[1] for w in want]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)


def test_generator_gives_the_same_elements_as_a_loop_each_repetition(arrays):
    x, y = arrays
    calls = []

    def generate():
        calls.append(1)
        yield from zip(x, y)

    signature = (tf.TensorSpec((3,), tf.float32), tf.TensorSpec((), tf.int64))
    ds = make_pipeline(generate, output_signature=signature, preprocess=_preprocess,
                       batch_size=8, repeat=2, deterministic=True)
    got = _rows(ds)
    want = _loop(x, y) * 2
    assert [g[1] for g in got] == [w[1] for w in want]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6)
    assert len(calls) == 2


def test_shuffle_permutes_each_pass_differently_and_keeps_every_element(arrays):
    x, y = arrays
    ds = make_pipeline((x, y), batch_size=23, shuffle=True, seed=3, repeat=2,
                       drop_remainder=True, deterministic=True)
    first, second = [b[1].numpy().tolist() for b in ds]
    assert sorted(first) == sorted(second) == y.tolist()
    assert first != y.tolist() and second != first
    rebuilt = make_pipeline((x, y), batch_size=23, shuffle=True, seed=3, repeat=2,
                            drop_remainder=True, deterministic=True)
    assert [b[1].numpy().tolist() for b in rebuilt] == [first, second]  # reproducible


def test_repeat_forever_and_batches_span_passes(arrays):
    x, y = arrays
    ds = make_pipeline((x, y), batch_size=10, repeat=True, deterministic=True)
    labels = np.concatenate([b[1].numpy() for b in ds.take(7)])
    assert labels.tolist() == (y.tolist() * 4)[:70]


def test_cache_reads_the_source_once_and_cache_preprocessed_skips_the_preprocess(arrays):
    x, y = arrays
    produced, preprocessed = [], []

    def generate():
        for a, b in zip(x, y):
            produced.append(1)
            yield a, b

    def counting(a, b):
        def count(v):
            preprocessed.append(1)
            return v
        a = tf.py_function(count, [a], tf.float32)
        a.set_shape((3,))
        return _preprocess(a, b)

    signature = (tf.TensorSpec((3,), tf.float32), tf.TensorSpec((), tf.int64))
    ds = make_pipeline(generate, output_signature=signature, preprocess=counting, batch_size=8,
                       cache=True, repeat=3, deterministic=True)
    assert len(_rows(ds)) == 3 * len(x)
    assert len(produced) == len(x)  # read once, then served from the cache
    assert len(preprocessed) == 3 * len(x)  # the preprocess still runs every pass

    produced.clear(), preprocessed.clear()
    ds = make_pipeline(generate, output_signature=signature, preprocess=counting, batch_size=8,
                       cache=True, cache_preprocessed=True, repeat=3, deterministic=True)
    got = _rows(ds)
    assert len(produced) == len(preprocessed) == len(x)
    assert [g[1] for g in got] == [w[1] for w in _loop(x, y)] * 3


def test_cache_preprocessed_with_a_vectorized_preprocess_still_shuffles_elements(arrays):
    x, y = arrays
    ds = make_pipeline((x, y), preprocess=_preprocess, vectorized=True, batch_size=5,
                       cache=True, cache_preprocessed=True, shuffle=True, seed=1, repeat=2,
                       deterministic=True)
    got = _rows(ds)
    labels = [g[1] for g in got]
    assert sorted(labels[:23]) == sorted(labels[23:]) == (y + 10).tolist()
    assert labels[:5] != (y[:5] + 10).tolist()
    by_label = dict((g[1], g[0]) for g in got)
    want = dict((w[1], w[0]) for w in _loop(x, y))
    np.testing.assert_allclose([by_label[k] for k in sorted(want)],
                               [want[k] for k in sorted(want)], rtol=1e-6)


def test_cache_to_files_with_shuffled_file_names(tmp_path):
    for i in range(6):
        np.save(tmp_path / f"{i}.npy", np.full((2,), i, np.float32))

    def decode(path):
        row = tf.numpy_function(lambda p: np.load(p.decode()), [path], tf.float32)
        row.set_shape((2,))
        return row

    ds = make_pipeline(str(tmp_path / "*.npy"), decode=decode, batch_size=6, shuffle=True,
                       seed=0, cache=str(tmp_path / "cache"), repeat=3)
    passes = [b[:, 0].numpy().tolist() for b in ds]
    assert [sorted(p) for p in passes] == [[0, 1, 2, 3, 4, 5]] * 3
    assert len({tuple(p) for p in passes}) > 1  # shuffled after the cache, not replayed
    assert list(tmp_path.glob("cache*"))


def test_io_threads_and_options():
    ds = make_pipeline(np.zeros((4, 2), np.float32), batch_size=2, io_threads=16)
    assert ds.options().threading.private_threadpool_size >= 16
    assert ds.options().experimental_optimization.parallel_batch is True
    x = next(iter(ds))
    assert tuple(x.shape) == (2, 2)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file matches"):
        make_pipeline(str(tmp_path / "*.npy"), decode=tf.io.read_file, batch_size=2)
    with pytest.raises(ValueError, match="decode="):
        make_pipeline(str(tmp_path / "*.npy"), batch_size=2)
    with pytest.raises(ValueError, match="output_signature"):
        make_pipeline(lambda: iter([]), batch_size=2)
    with pytest.raises(ValueError, match="only once"):
        make_pipeline(iter([1.0, 2.0]), output_signature=tf.TensorSpec((), tf.float32),
                      batch_size=2, repeat=2)
    with pytest.raises(ValueError, match="different lengths"):
        make_pipeline((np.zeros(3), np.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_pipeline(np.zeros(3), batch_size=0)
    with pytest.raises(ValueError, match="first axis"):
        make_pipeline(np.float32(1.0), batch_size=1)
    with pytest.raises(ValueError, match="cache_preprocessed"):
        make_pipeline(np.zeros(3), batch_size=1, preprocess=tf.identity, cache_preprocessed=True)


def test_generator_object_is_read_once_or_into_the_cache():
    signature = tf.TensorSpec((), tf.float32)
    ds = make_pipeline(iter([1.0, 2.0, 3.0]), output_signature=signature, batch_size=3,
                       repeat=1, deterministic=True)
    assert [b.numpy().tolist() for b in ds] == [[1.0, 2.0, 3.0]]
    ds = make_pipeline(iter([1.0, 2.0, 3.0]), output_signature=signature, batch_size=3,
                       cache=True, repeat=2, deterministic=True)
    assert [b.numpy().tolist() for b in ds] == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]


# ------------------------------------------------------------------- probe


def _slow_preprocess(x, y):
    def wait(v):
        time.sleep(0.02)
        return v
    x2 = tf.py_function(wait, [x], tf.float32)
    x2.set_shape(x.shape)
    return x2, y


def _model(width: int, inputs: int = 3):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((inputs,)),
                              keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def test_probe_says_input_bound_when_the_preprocess_waits(arrays):
    x, y = arrays
    model = _model(8)
    weights = model.get_weights()
    ds = make_pipeline((x, y.astype(np.float32)), preprocess=_slow_preprocess, vectorized=True,
                       batch_size=4, repeat=True)
    probe = probe_input(ds, model, batches=8, warmup=2)
    assert probe.input_bound is True
    assert str(probe).startswith("input-bound")
    assert probe.input_batches_per_s < probe.model_batches_per_s
    assert probe.expected_slowdown > 1.1
    # The probe trained on copies of the state it then put back.
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert int(model.optimizer.iterations.numpy()) == 0


def test_probe_says_not_input_bound_for_a_trivial_pipeline_and_a_heavier_model():
    rng = np.random.default_rng(0)
    x = rng.random((2048, 256), dtype=np.float32)
    y = rng.random((2048, 1), dtype=np.float32)
    model = _model(1024, inputs=256)
    ds = make_pipeline((x, y), batch_size=256, shuffle=True, repeat=True)
    probe = probe_input(ds, model, batches=10, warmup=2)
    assert probe.input_bound is False, probe.verdict
    assert str(probe).startswith("not input-bound")
    assert probe.input_samples_per_s == pytest.approx(probe.input_batches_per_s * 256)


def test_expected_slowdown_credits_idle_cores():
    from keras_tandem.data.probe import _expected_slowdown

    ms = 1e-3
    # A pipeline slower than the step: the step waits for it.
    assert _expected_slowdown(20 * ms, 10 * ms, 1 * ms, 10 * ms, cores=2) == 2.0
    # A step keeping both of 2 cores busy: the pipeline's 4 ms of CPU add to it.
    assert _expected_slowdown(2 * ms, 10 * ms, 4 * ms, 20 * ms, cores=2) == 1.4
    # The same step on 16 cores leaves 14 idle: the pipeline's CPU mostly hides.
    assert _expected_slowdown(2 * ms, 10 * ms, 4 * ms, 20 * ms, cores=16) == 1.05
    # A GPU step barely uses the host: only the pipeline's own rate counts.
    assert _expected_slowdown(2 * ms, 10 * ms, 4 * ms, 0.0, cores=2) == 1.0


def test_probe_without_a_model_measures_the_pipeline_only(arrays):
    x, y = arrays
    probe = probe_input(make_pipeline((x, y), batch_size=2), batches=5)
    assert probe.input_bound is None and probe.model_batches_per_s is None
    assert probe.batches == 5 and "batches/s" in str(probe)
    with pytest.raises(ValueError, match="at least"):
        probe_input(make_pipeline((x, y), batch_size=20), batches=5)
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="compiled"):
        probe_input(make_pipeline((x, y), batch_size=2), uncompiled)
