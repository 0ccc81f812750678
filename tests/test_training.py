"""train_in_background: inputs, progress, stop/join, errors while serving, checkpoints, resume."""

import importlib.util
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from _poll import wait_until
from keras_tandem import Predictor, PublishWeights, train_in_background

IN, CLASSES = 8, 3


def make_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((IN,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(CLASSES)])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def make_data(rows: int = 256):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, IN)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 1).astype("int32")
    return x, y


def serves_model_weights(predictor: Predictor, model: keras.Model, x: np.ndarray) -> bool:
    return np.allclose(predictor.predict(x), keras.ops.convert_to_numpy(model(x)),
                       rtol=1e-4, atol=1e-5)


def test_arrays_publish_at_each_epoch_end_and_join_returns_history():
    model = make_model()
    x, y = make_data()
    with Predictor(model) as predictor:
        run = train_in_background(model, (x, y), epochs=3, batch_size=32, publish_to=predictor)
        history = run.join(timeout=60)
        assert run.done and run.error is None
        assert history is run.history and history.epoch == [0, 1, 2]
        assert set(history.history) == {"loss", "accuracy"}
        p = run.progress
        assert (p.epoch, p.epochs, p.step, p.steps_per_epoch) == (2, 3, 8, 8)
        assert p.total_steps == 24 and p.done
        # One snapshot per epoch end, nothing new at train end. The hand-off
        # thread publishes only the newest: on a loaded machine an epoch's
        # snapshot can be superseded by the next before its turn.
        (publisher,) = run.publishers
        assert p.published + publisher.superseded == 3 and publisher.refused == 0
        assert p.published >= 1 and p.version == predictor.version == p.published
        assert set(p.logs) == {"loss", "accuracy"} and p.epoch_logs["loss"] > 0
        assert serves_model_weights(predictor, model, x[:8])  # the last epoch's, always


@pytest.mark.filterwarnings("ignore:Your input ran out of data")  # Keras, on any generator
def test_generator_dataset_and_validation_inputs():
    x, y = make_data()
    model = make_model()

    def batches():
        for i in range(0, len(x), 64):
            yield x[i:i + 64], y[i:i + 64]

    with Predictor(model) as predictor:
        run = train_in_background(model, batches(), epochs=1, publish_to=[predictor])
        assert run.join(60).epoch == [0] and run.progress.total_steps == 4
        assert predictor.version == 1 and serves_model_weights(predictor, model, x[:4])

        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow as tf  # Keras' JAX and PyTorch trainers take tf.data too

            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(50)
            run = train_in_background(model, ds, epochs=2, publish_to=predictor)
            assert run.join(60).epoch == [0, 1] and run.progress.total_steps == 12

        run = train_in_background(model, (x, y), epochs=2, batch_size=64, validation_split=0.25)
        history = run.join(60).history
        assert len(history["val_loss"]) == 2
        assert run.progress.steps_per_epoch == 3  # 192 training rows of 256


class GateAt(keras.callbacks.Callback):
    """Holds training at the end of batch `at` (counted from 1) until `release` is set."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.seen = at, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at:
            self.reached.set()
            assert self.release.wait(60), "the test never released training"


def test_stop_ends_at_the_next_batch_and_publishes_the_final_weights():
    model = make_model()
    x, y = make_data()
    gate = GateAt(3)
    with Predictor(model) as predictor:
        run = train_in_background(model, (x, y), epochs=100_000, batch_size=8,
                                  publish_to=PublishWeights(predictor, on_epoch_end=False),
                                  callbacks=[gate])
        try:
            assert gate.reached.wait(60), run.error
            assert not run.done and run.progress.total_steps in (2, 3)  # batch 3 is held
            with pytest.raises(TimeoutError):
                run.join(timeout=0.05)
            with pytest.raises(RuntimeError, match="already training"):
                train_in_background(model, (x, y), epochs=1)
            run.stop()  # asked during batch 3: the fit ends after it
        finally:
            gate.release.set()
        history = run.join(timeout=60)
        assert run.done and run.error is None
        assert history.epoch == [0] and run.progress.total_steps == 3
        assert predictor.version == 1  # published on stop (train end) only
        assert serves_model_weights(predictor, model, x[:8])
        assert run.join() is history  # joining again gives the same answer


class FailAt(keras.callbacks.Callback):
    def __init__(self, epoch: int, batch: int):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise RuntimeError("boom in training")


def test_a_training_error_is_raised_by_join_while_serving_goes_on():
    model = make_model()
    x, y = make_data()
    served: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with Predictor(model) as predictor:

        def client():
            while not stop.is_set():
                try:
                    served.append(predictor.predict(x[0], return_version=True)[1])
                except BaseException as e:  # noqa: BLE001 - asserted below
                    failures.append(e)
                    return

        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        run = train_in_background(model, (x, y), epochs=5, batch_size=32, publish_to=predictor,
                                  callbacks=[FailAt(epoch=1, batch=2)])
        with pytest.raises(RuntimeError, match="boom in training"):
            run.join(timeout=60)
        assert run.done and isinstance(run.error, RuntimeError)
        after_failure = len(served)
        wait_until(lambda: len(served) >= after_failure + 20 or failures,
                   message="clients got no answers after the training error")
        stop.set()
        for c in clients:
            c.join(10)
        assert not failures
        assert predictor.version == 1  # epoch 0 was published; the failed epoch was not
        out, version = predictor.predict(x[:4], return_version=True)
        assert version == 1 and np.isfinite(out).all()
        assert served and max(served) == 1


def test_bad_arguments_fail_in_the_caller():
    with pytest.raises(ValueError, match="compile"):
        train_in_background(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
                            make_data(), epochs=1)
    with pytest.raises(TypeError):
        train_in_background(make_model(), [1, 2, 3], epochs=1)


def test_checkpoint_dir_keeps_last_and_best_models(tmp_path):
    model = make_model()
    x, y = make_data()
    run = train_in_background(model, (x, y), epochs=2, batch_size=32, validation_split=0.2,
                              checkpoint_dir=tmp_path / "ckpt")
    run.join(60)
    for name in ("last.keras", "best.keras"):
        loaded = keras.models.load_model(tmp_path / "ckpt" / name)
        assert len(loaded.get_weights()) == len(model.get_weights())
    last = keras.models.load_model(tmp_path / "ckpt" / "last.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(last(x[:4])),
                               keras.ops.convert_to_numpy(model(x[:4])), rtol=1e-5)
    # The backup is for an interrupted run only: Keras removes it when training completes.
    assert not list((tmp_path / "ckpt" / "backup").glob("*.h5"))


RESUMABLE = textwrap.dedent("""
    import os, sys, time
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import keras, numpy as np
    from keras_tandem import train_in_background

    checkpoint_dir, log_path = sys.argv[1], sys.argv[2]
    keras.utils.set_random_seed(0)
    x = np.random.rand(256, 8).astype("float32")
    y = (x.sum(axis=1) > 4).astype("int32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log = open(log_path, "a", buffering=1)

    class Log(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            log.write(f"begin {epoch}\\n")
        def on_train_batch_end(self, batch, logs=None):
            time.sleep(0.01)  # slow enough to be killed mid-training
        def on_epoch_end(self, epoch, logs=None):
            log.write(f"end {epoch}\\n")  # after BackupAndRestore saved this epoch

    run = train_in_background(model, (x, y), epochs=500, batch_size=32,
                              checkpoint_dir=checkpoint_dir, callbacks=[Log()])
    run.join()
    log.write("finished\\n")
""")


def _wait_for_line(path: Path, proc: subprocess.Popen, predicate, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().split("\n") if path.exists() else []
        if any(predicate(line) for line in lines):
            return lines
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited early ({proc.returncode}): "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting in {path}: {path.read_text()[-500:]}")


def test_training_killed_with_sigkill_resumes_from_the_last_saved_epoch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(RESUMABLE)
    ckpt = tmp_path / "ckpt"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"

    def start(log: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(ckpt), str(log)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    proc = start(first_log)
    try:
        _wait_for_line(first_log, proc, lambda line: line == "end 2", timeout=90)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = max(int(line.split()[1]) for line in first_log.read_text().split("\n")
                if line.startswith("end "))
    assert saved >= 2

    proc = start(second_log)
    try:
        lines = _wait_for_line(second_log, proc, lambda line: line.startswith("begin "),
                               timeout=90)
    finally:
        proc.kill()
        proc.wait(10)
    resumed_at = int(next(line for line in lines if line.startswith("begin ")).split()[1])
    # Killed after saving epoch `saved` (or a later one it finished before the kill).
    assert resumed_at >= saved + 1 > 0
