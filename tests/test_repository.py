"""Versions on disk (`server/_repository.py`) without HTTP: which version serves, and when.

Each test writes tiny `.keras` models into numbered directories under
`tmp_path` and drives a `VersionWatcher` one `poll_once()` at a time (a file
counts as complete once it is unchanged between two polls), so no test waits
for a polling thread except the one that checks that thread.
"""

import threading
import zipfile

import keras
import numpy as np
import pytest

from _poll import wait_until
from keras_tandem import PredictorClosed
from keras_tandem.server._repository import (
    AVAILABLE,
    END,
    LOADING,
    ServedModel,
    VersionWatcher,
)

OPTIONS = {"max_batch_size": 4}
X = np.linspace(-1.0, 1.0, 8, dtype=np.float32).reshape(2, 4)
LOAD_GATE = threading.Event()
LOAD_GATE.set()


@keras.saving.register_keras_serializable(package="keras_tandem_tests")
class HeldWhileLoading(keras.layers.Layer):
    """An identity layer whose loading waits for `LOAD_GATE`: a slow load, on demand."""

    def call(self, x):
        return x

    @classmethod
    def from_config(cls, config):
        if not LOAD_GATE.wait(30):
            raise TimeoutError("LOAD_GATE was never opened")
        return cls(**config)


def mlp(seed, hidden=8, held=False):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,), name="x")
    h = HeldWhileLoading()(x) if held else x
    h = keras.layers.Dense(hidden, activation="relu")(h)
    return keras.Model(x, keras.layers.Dense(3)(h))


def expected(model):
    return keras.ops.convert_to_numpy(model(X, training=False))


def save(base, version, model, name="model.keras"):
    folder = base / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / name)
    return folder / name


@pytest.fixture
def base(tmp_path):
    return tmp_path / "models"


@pytest.fixture
def watched(base):
    """A `ServedModel` with nothing loaded yet and a watcher on `base`; closes what it loads."""
    base.mkdir()
    served = ServedModel("m")
    predictors = []
    served.on_new_predictor = lambda _old: predictors.append(served.current.predictor)
    watcher = VersionWatcher(served, base, OPTIONS, poll_interval_s=0.01, settle_s=3600)
    yield served, watcher
    watcher.stop()
    for p in predictors:
        p.close()


def poll_twice(watcher):
    """A file is complete once it is unchanged between two polls."""
    watcher.poll_once()
    watcher.poll_once()


def serving(served):
    """(model version, the answer for X) of what serves now."""
    current = served.current
    return current.version, current.predictor.predict(X)


def states(served):
    return {e["version"]: (e["state"], e["status"]["error_code"]) for e in served.status()}


# ---------------------------------------------------------------- discovery


def test_scan_finds_numbered_version_directories_and_their_model_file(base):
    save(base, 1, mlp(1))
    save(base, 12, mlp(1), name="classifier.keras")  # the only .keras file of its version
    (base / "3").mkdir()  # no model yet
    (base / "4").mkdir()
    (base / "4" / "a.keras").write_bytes(b"")
    (base / "4" / "b.keras").write_bytes(b"")  # two candidates, neither is model.keras
    (base / "latest").mkdir()  # not a version number
    (base / "5").write_bytes(b"")  # a file, not a directory
    found = VersionWatcher(ServedModel("m"), base, OPTIONS).scan()
    assert found == {1: base / "1" / "model.keras", 12: base / "12" / "classifier.keras",
                     3: None, 4: None}
    assert VersionWatcher(ServedModel("m"), base / "missing", OPTIONS).scan() == {}


def test_the_newest_complete_version_serves_at_start(base, watched):
    served, watcher = watched
    models = {v: mlp(v) for v in (2, 9, 10)}
    for v, m in models.items():
        save(base, v, m)
    (base / "11").mkdir()
    (base / "11" / "model.keras").write_bytes(b"PK\x03\x04 half an archive")
    watcher.load_initial()
    version, answer = serving(served)
    assert version == 10  # by number, not by name ("9" > "10" as text); 11 is not complete
    np.testing.assert_allclose(answer, expected(models[10]), rtol=1e-5, atol=1e-6)
    assert states(served) == {"10": (AVAILABLE, "OK")}


def test_of_several_new_versions_only_the_newest_loads(base, watched):
    served, watcher = watched
    save(base, 1, mlp(1))
    watcher.load_initial()
    models = {v: mlp(v) for v in (2, 3)}
    for v, m in models.items():
        save(base, v, m)
    watcher.poll_once()
    assert served.current.version == 1  # seen once: maybe still being written
    watcher.poll_once()
    version, answer = serving(served)
    assert version == 3
    np.testing.assert_allclose(answer, expected(models[3]), rtol=1e-5, atol=1e-6)
    assert states(served) == {"3": (AVAILABLE, "OK"), "1": (END, "OK")}  # 2 never loaded
    save(base, 2, mlp(2))  # an older version showing up late is never loaded
    poll_twice(watcher)
    assert served.current.version == 3


# ------------------------------------------------------- complete files only


def test_a_half_written_file_waits_until_it_is_whole(base, watched, tmp_path):
    served, watcher = watched
    save(base, 1, mlp(1))
    watcher.load_initial()
    model = mlp(2)
    model.save(tmp_path / "whole.keras")
    data = (tmp_path / "whole.keras").read_bytes()
    target = base / "2" / "model.keras"
    target.parent.mkdir()
    target.write_bytes(data[: len(data) // 2])
    for _ in range(3):  # unchanged, but not a valid archive, and young: not reported
        watcher.poll_once()
    assert served.current.version == 1 and served.state_of(2) is None
    with open(target, "ab") as f:
        f.write(data[len(data) // 2:])
    watcher.poll_once()
    assert served.current.version == 1  # changed since the last poll: look again
    watcher.poll_once()
    version, answer = serving(served)
    assert version == 2
    np.testing.assert_allclose(answer, expected(model), rtol=1e-5, atol=1e-6)


def test_an_invalid_archive_that_stopped_changing_is_reported_once_then_retried_if_changed(
        base, watched):
    served, watcher = watched
    watcher.settle_s = 0  # no writer pauses in this test
    save(base, 1, mlp(1))
    watcher.load_initial()
    target = base / "2" / "model.keras"
    target.parent.mkdir()
    target.write_bytes(b"garbage" * 100)
    poll_twice(watcher)
    assert states(served)["2"] == (END, "UNKNOWN")
    assert "not a complete .keras archive" in served.status(2)[0]["status"]["error_message"]
    poll_twice(watcher)
    assert served.load_failures == 1  # the same file is not tried again
    assert served.current.version == 1
    model = mlp(2)
    model.save(target)  # a new file in the same version: tried again
    poll_twice(watcher)
    version, answer = serving(served)
    assert version == 2 and served.load_failures == 1
    np.testing.assert_allclose(answer, expected(model), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ failed loads


def test_a_version_that_fails_to_load_is_reported_and_the_old_one_keeps_serving(base, watched):
    served, watcher = watched
    first = mlp(1)
    save(base, 1, first)
    watcher.load_initial()
    (base / "2").mkdir()
    with zipfile.ZipFile(base / "2" / "model.keras", "w") as z:  # a valid zip, not a model
        z.writestr("config.json", '{"class_name": "NoSuchLayer", "config": {}}')
        z.writestr("metadata.json", "{}")
    poll_twice(watcher)
    unsafe = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2)])
    save(base, 3, unsafe)  # safe_mode refuses to deserialize a Lambda
    poll_twice(watcher)
    assert states(served) == {"3": (END, "UNKNOWN"), "2": (END, "UNKNOWN"),
                              "1": (AVAILABLE, "OK")}
    assert "safe_mode" in served.status(3)[0]["status"]["error_message"]
    assert served.load_failures == 2
    version, answer = serving(served)
    assert version == 1
    np.testing.assert_allclose(answer, expected(first), rtol=1e-5, atol=1e-6)


def test_a_version_is_loading_while_the_old_one_answers(base, watched):
    served, watcher = watched
    first, second = mlp(1), mlp(2, held=True)
    save(base, 1, first)
    watcher.load_initial()
    save(base, 2, second)
    watcher.poll_once()
    LOAD_GATE.clear()
    try:
        poller = threading.Thread(target=watcher.poll_once)
        poller.start()
        wait_until(lambda: served.state_of(2) == LOADING, 30, "version 2 never started loading")
        assert states(served) == {"2": (LOADING, "OK"), "1": (AVAILABLE, "OK")}
        version, answer = serving(served)
        assert version == 1
        np.testing.assert_allclose(answer, expected(first), rtol=1e-5, atol=1e-6)
    finally:
        LOAD_GATE.set()
    poller.join(60)
    assert not poller.is_alive()
    assert states(served) == {"2": (AVAILABLE, "OK"), "1": (END, "OK")}
    version, answer = serving(served)
    assert version == 2
    np.testing.assert_allclose(answer, expected(second), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------- swapping versions in


def test_same_architecture_swaps_weights_and_another_one_gets_a_new_predictor(base, watched):
    served, watcher = watched
    model = mlp(1)
    save(base, 1, model)
    watcher.load_initial()
    first = served.current.predictor
    model.set_weights(mlp(2).get_weights())  # trained on: the same model, new weights
    save(base, 2, model)
    poll_twice(watcher)
    assert served.current.predictor is first  # the weights were swapped in
    assert served.current.label(first.version) == 2
    np.testing.assert_allclose(serving(served)[1], expected(model), rtol=1e-5, atol=1e-6)
    wider = mlp(3, hidden=16)
    save(base, 3, wider)
    poll_twice(watcher)
    version, answer = serving(served)
    assert version == 3 and served.current.predictor is not first
    np.testing.assert_allclose(answer, expected(wider), rtol=1e-5, atol=1e-6)
    with pytest.raises(PredictorClosed):  # the one it replaced was closed
        first.predict(X)


def test_the_watcher_thread_polls_until_stopped(base, watched):
    served, watcher = watched
    save(base, 1, mlp(1))
    watcher.load_initial()
    before = set(threading.enumerate())
    watcher.start()
    save(base, 2, mlp(2))
    wait_until(lambda: served.current.version == 2, 60, "the watcher never loaded version 2")
    watcher.stop()
    assert not [t for t in threading.enumerate()
                if t not in before and t.name == "keras-tandem-watcher"]
