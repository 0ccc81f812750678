"""On Keras' JAX and PyTorch backends: no TensorFlow imported, TF-only features say so.

Each check runs in a child process, whose backend is fixed before Keras is imported.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(
    importlib.util.find_spec(b) is None, reason=f"{b} is not installed")) for b in ("jax", "torch")]


def run_child(backend: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_public_api_serves_and_publishes_without_importing_tensorflow(backend):
    child = run_child(backend, """
        import sys
        import numpy as np
        import keras_tandem
        from keras_tandem import Predictor, PublishWeights, serve, train_in_background
        import keras

        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
        x = np.ones((64, 4), "float32")
        with Predictor(model, max_batch_size=8) as p:
            run = train_in_background(model, (x, np.zeros((64, 2), "float32")), epochs=1,
                                      publish_to=PublishWeights(p, every_n_batches=1, wait=True))
            run.join(120)
            print(p.stats()["call_path"], p.version)
            assert np.allclose(p.predict(x[:3]), keras.ops.convert_to_numpy(model(x[:3])),
                               atol=1e-5)
        print("tensorflow" in sys.modules)
    """)
    assert child.returncode == 0, child.stderr[-3000:]
    lines = child.stdout.split("\n")
    expected_path = {"jax": "jax jit", "torch": "torch inference_mode"}[backend]
    assert lines[0] == f"{expected_path} 2"  # one publish per batch: 2 batches of 32
    assert lines[1] == "False", "TensorFlow was imported"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tf_only_features_say_what_they_need(backend):
    child = run_child(backend, """
        from keras_tandem import choose_strategy
        try:
            choose_strategy()
        except RuntimeError as e:
            print(e)
    """)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "needs Keras' TensorFlow backend" in child.stdout
    assert f"runs Keras on '{backend}'" in child.stdout
