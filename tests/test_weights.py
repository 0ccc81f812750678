"""PublishWeights: answers match the version they report, NaN refused, schedule, failures."""

import threading
import warnings

import keras
import numpy as np
import pytest

from keras_tandem import Predictor, PublishWeights, train_in_background
from keras_tandem.training import publish
from keras_tandem.training.publish import all_finite

IN, OUT = 8, 4


def make_model(lr: float = 0.5, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((IN,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dense(OUT)])
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model


def make_data(rows: int = 640, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, IN)).astype("float32")
    y = rng.normal(size=(rows, OUT)).astype("float32")
    return x, y


class Recorder:
    """Stands in for a Predictor: records the weights of every version it publishes."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.weights: dict[int, list[np.ndarray]] = {}

    def update_weights(self, arrays):
        copies = [np.array(a, copy=True) for a in arrays]
        version = self.predictor.update_weights(arrays)
        self.weights[version] = copies
        return version


def test_every_answer_equals_the_output_of_the_version_it_reports():
    model = make_model()
    reference = make_model()
    x, y = make_data()
    with Predictor(model, max_batch_size=64) as predictor:
        recorder = Recorder(predictor)
        recorder.weights[0] = model.get_weights()
        publisher = PublishWeights(recorder, every_n_batches=3)
        answers: list[list[tuple[np.ndarray, np.ndarray, int]]] = [[] for _ in range(32)]
        errors: list[BaseException] = []
        started = threading.Barrier(33)
        stop = threading.Event()

        def client(i: int) -> None:
            rng = np.random.default_rng(100 + i)
            started.wait()
            try:
                while not stop.is_set() and len(answers[i]) < 5000:
                    q = rng.normal(size=(1 + i % 3, IN)).astype("float32")
                    out, version = predictor.predict(q, return_version=True)
                    answers[i].append((q, out, version))
            except BaseException as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        started.wait()
        run = train_in_background(model, (x, y), epochs=3, batch_size=16,
                                  callbacks=[publisher])
        run.join(timeout=120)
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    # Snapshots read (each published, or superseded by a newer one while the
    # hand-off thread waited on a busy worker: how many depends on the load).
    assert publisher.published + publisher.superseded >= 10 and publisher.refused == 0
    by_version: dict[int, list] = {}
    for thread_answers in answers:
        for q, out, version in thread_answers:
            by_version.setdefault(version, []).append((q, out))
    assert len(by_version) >= 3, f"too few versions served: {sorted(by_version)}"
    distinguishable = 0
    for version, pairs in by_version.items():
        assert version in recorder.weights, f"answer reports unknown version {version}"
        qs = np.concatenate([q for q, _ in pairs])
        outs = np.concatenate([o for _, o in pairs])
        reference.set_weights(recorder.weights[version])
        expected = keras.ops.convert_to_numpy(reference(qs, training=False))
        np.testing.assert_allclose(outs, expected, rtol=1e-4, atol=1e-5,
                                   err_msg=f"answers of version {version}")
        if version + 1 in recorder.weights:
            reference.set_weights(recorder.weights[version + 1])
            other = keras.ops.convert_to_numpy(reference(qs, training=False))
            distinguishable += not np.allclose(outs, other, rtol=1e-4, atol=1e-5)
    # The check above could tell neighbouring versions apart, so it is not vacuous.
    assert distinguishable >= 1


class PoisonAt(keras.callbacks.Callback):
    """Sets every weight to NaN at the end of training batch `at` (counted across epochs)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.seen = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])


def test_nan_weights_are_refused_and_serving_keeps_the_last_good_version():
    model = make_model(lr=0.05)
    x, y = make_data(rows=320)
    with Predictor(model) as predictor:
        recorder = Recorder(predictor)
        publisher = PublishWeights(recorder, every_n_batches=4, wait=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Poisoned after batch 10: publishes at batches 4 and 8 are good, all later refused.
            model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                      callbacks=[PoisonAt(10), publisher])
        refusals = [w for w in caught if "NaN or Inf" in str(w.message)]
        assert len(refusals) == 1, "warned once, not per refusal"
        assert publisher.published == 2 and predictor.version == 2
        assert publisher.refused >= 3  # batches 12, 16, 20, epoch ends, ...
        q = x[:5]
        out, version = predictor.predict(q, return_version=True)
        assert version == 2 and np.isfinite(out).all()
        good = make_model()
        good.set_weights(recorder.weights[2])
        np.testing.assert_allclose(out, keras.ops.convert_to_numpy(good(q)), rtol=1e-4, atol=1e-5)


def test_all_finite():
    assert all_finite([np.zeros(3), np.arange(4)])
    assert not all_finite([np.zeros(3), np.array([1.0, np.inf])])
    assert not all_finite([np.array([[np.nan]], dtype="float16")])


def test_schedule_by_batch_count_epoch_end_and_train_end():
    model = make_model(lr=0.01)
    x, y = make_data(rows=160)  # 10 batches of 16 per epoch
    with Predictor(model) as predictor:
        publisher = PublishWeights(predictor, every_n_batches=3, wait=True)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[publisher])
        # Per epoch: after batches 3, 6, 9, then the epoch end (batch 10); nothing
        # left for train end.
        assert publisher.published == 8 and predictor.version == 8
        assert publisher.last_version == 8 and publisher.superseded == 0
        assert 0 < publisher.publish_seconds_mean <= publisher.publish_seconds_max
        # The mean is over the 8 snapshots read, and no read took longer than the max.
        assert publisher.publish_seconds_total == pytest.approx(8 * publisher.publish_seconds_mean)
        assert publisher.publish_seconds_total <= 8 * publisher.publish_seconds_max

        only_end = PublishWeights(predictor, on_epoch_end=False, wait=True)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[only_end])
        assert only_end.published == 1 and predictor.version == 9  # train end only


def test_hand_off_thread_publishes_the_newest_snapshot_and_flushes_at_train_end():
    model = make_model(lr=0.01)
    x, y = make_data(rows=160)
    with Predictor(model) as predictor:
        publisher = PublishWeights(predictor, every_n_batches=1)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[publisher])
        # 20 snapshots: each published, or replaced by a newer one while it waited.
        assert publisher.published + publisher.superseded == 20
        assert publisher.published >= 1 and predictor.version == publisher.published
        assert publisher.last_version == predictor.version
        # on_train_end waited for the last snapshot: the final weights are served.
        np.testing.assert_allclose(predictor.predict(x[:4]),
                                   keras.ops.convert_to_numpy(model(x[:4])), rtol=1e-4, atol=1e-5)
        assert publisher._thread is None  # the hand-off thread ended with training
        assert publisher.swap_seconds_max > 0


def test_every_seconds_and_several_predictors(monkeypatch):
    model = make_model(lr=0.01)
    x, y = make_data(rows=160)  # 10 batches of 16
    clock = [0.0]
    monkeypatch.setattr(publish, "_now", lambda: clock[0])

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            clock[0] += 0.03  # each batch takes 30 ms on the fake clock

    with Predictor(model) as a, Predictor(model) as b:
        publisher = PublishWeights([a, b], every_seconds=0.1, on_epoch_end=False, wait=True)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[Tick(), publisher])
        # By time after batches 4 (0.12 s) and 8 (0.24 s); at train end for batches 9-10.
        assert publisher.published == 3
        assert publisher.last_versions == [a.version, b.version] == [3, 3]
        np.testing.assert_allclose(a.predict(x[:3]), b.predict(x[:3]))
        np.testing.assert_allclose(a.predict(x[:3]), keras.ops.convert_to_numpy(model(x[:3])),
                                   rtol=1e-4, atol=1e-5)


def test_a_closed_predictor_does_not_stop_training():
    model = make_model(lr=0.01)
    x, y = make_data(rows=160)
    predictor = Predictor(model)
    predictor.close()
    publisher = PublishWeights(predictor, every_n_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[publisher])
    assert len(history.epoch) == 2
    assert publisher.published == 0 and publisher.failed >= 1
    assert len([w for w in caught if "did not take" in str(w.message)]) == 1


def test_weights_that_do_not_fit_raise():
    model = make_model()
    other = keras.Sequential([keras.Input((IN,)), keras.layers.Dense(OUT)])
    x, y = make_data(rows=64)
    with Predictor(other) as predictor:
        with pytest.raises(ValueError):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                      callbacks=[PublishWeights(predictor, every_n_batches=1)])
        assert predictor.version == 0


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        PublishWeights([])
    with pytest.raises(TypeError):
        PublishWeights(object())
    with Predictor(make_model()) as p:
        with pytest.raises(ValueError):
            PublishWeights(p, every_n_batches=0)
        with pytest.raises(ValueError):
            PublishWeights(p, every_seconds=0)


# ------------------------------------------- the trainer's live state, every backend


class Snapshots:
    """Stands in for a Predictor: keeps a copy of every snapshot handed over, in order."""

    def __init__(self, hold_first_until: threading.Event | None = None):
        self.snapshots: list[list[np.ndarray]] = []
        self.hold = hold_first_until
        self.first_arrived = threading.Event()  # the hand-off thread has the first snapshot

    def update_weights(self, arrays):
        self.first_arrived.set()
        if self.hold is not None and not self.snapshots:
            # The hand-off thread holds the first snapshot while training goes on:
            # a snapshot that views the live weights would change under it.
            assert self.hold.wait(60), "training never went past the publish"
        self.snapshots.append([np.array(a, copy=True) for a in arrays])
        return len(self.snapshots)


def trained_for(steps: int, x: np.ndarray, y: np.ndarray, batch: int) -> list[np.ndarray]:
    """The weights of a fresh model after exactly `steps` batches (Keras writes them back)."""
    model = make_model()
    model.fit(x[:steps * batch], y[:steps * batch], batch_size=batch, epochs=1,
              shuffle=False, verbose=0)
    return model.get_weights()


def test_published_weights_are_the_trainers_state_at_that_batch():
    # On JAX the trainer holds the live state outside the variables during
    # fit; a publish must hand over that state, not purged or stale values.
    x, y = make_data(rows=32 * 9)
    model = make_model()
    start = model.get_weights()
    sink = Snapshots()
    publisher = PublishWeights(sink, every_n_batches=3, on_epoch_end=False, wait=True)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[publisher])
    assert len(sink.snapshots) == 3  # after batches 3, 6, 9
    previous = start
    for k, snapshot in enumerate(sink.snapshots, start=1):
        expected = trained_for(3 * k, x, y, 32)
        for got, want in zip(snapshot, expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert any(not np.allclose(a, b) for a, b in zip(snapshot, previous))
        previous = snapshot


def test_a_snapshot_is_not_changed_by_later_optimizer_steps():
    # The hand-off thread checks and hands over a snapshot while training
    # runs on: it must be a copy taken at the publish, not a view of weights
    # the optimizer updates in place (PyTorch) or buffers it donates (JAX).
    x, y = make_data(rows=32 * 8)
    model = make_model()
    later = threading.Event()

    class ReleaseAfter(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == 3:
                # The first publish was just queued: let the hand-off thread take
                # it before training goes on, else the next one would supersede it.
                assert sink.first_arrived.wait(60), "the hand-off thread never took it"
            if batch + 1 == 6:  # three optimizer steps after the first publish
                later.set()

    sink = Snapshots(hold_first_until=later)
    publisher = PublishWeights(sink, every_n_batches=3, on_epoch_end=False)
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0,
              callbacks=[publisher, ReleaseAfter()])
    assert later.is_set() and sink.snapshots
    for got, want in zip(sink.snapshots[0], trained_for(3, x, y, 32)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
