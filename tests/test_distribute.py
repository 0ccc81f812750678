"""choose_strategy: the decision, MirroredStrategy on two logical CPUs, and TF_CONFIG clusters.

Logical devices must be configured before TensorFlow initialises its
devices, so every test that builds a strategy runs in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import pytest

from keras_tandem.cluster.strategy import _plan

MIRRORED_CHILD = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    from keras_tandem import Predictor, choose_strategy, make_pipeline
    from keras_tandem.cluster.strategy import describe_strategy

    report = {"plain": describe_strategy(choose_strategy())}
    strategy = choose_strategy(devices="CPU")
    report["mirrored"] = describe_strategy(strategy)
    report["type"] = type(strategy).__name__
    report["replicas"] = strategy.num_replicas_in_sync

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras.Sequential([keras.Input((8,)),
                                  keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3)])
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    report["variable"] = type(model.weights[0].value).__name__
    rng = np.random.default_rng(0)
    x = rng.random((256, 8), dtype=np.float32)
    y = (x.sum(axis=1) > 4).astype(np.int64)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(make_pipeline((x, y), batch_size=32, shuffle=True, repeat=True),
                        steps_per_epoch=4, epochs=2, verbose=0)
    report["losses"] = history.history["loss"]
    report["trained"] = any(not np.array_equal(a, b)
                            for a, b in zip(before, model.get_weights()))

    probe = x[:50]
    with Predictor(model, max_batch_size=64) as predictor:
        served = predictor.predict(probe)
        report["max_diff"] = float(np.abs(served - model(probe).numpy()).max())
        old = model(probe).numpy()
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        # The Predictor keeps its own copy: training changes no answer...
        report["stale_diff"] = float(np.abs(predictor.predict(probe) - old).max())
        version = predictor.update_weights(model)
        # ...until the new weights are published.
        out, served_version = predictor.predict(probe, return_version=True)
        report["updated_diff"] = float(np.abs(out - model(probe).numpy()).max())
        report["versions"] = [version, served_version]
    print("REPORT " + json.dumps(report))
""")

WORKER_CHILD = textwrap.dedent("""
    import json
    from keras_tandem import choose_strategy
    from keras_tandem.cluster.strategy import collective_timeout, describe_strategy

    strategy = choose_strategy(collective_timeout_s=7)
    options = strategy.extended._communication_options  # TensorFlow's, read for the test
    print("REPORT " + json.dumps({"describe": describe_strategy(strategy),
                                  "replicas": strategy.num_replicas_in_sync,
                                  "timeout": collective_timeout(strategy),
                                  "tf_timeout": options.timeout_seconds}))
""")


def _start_child(code: str, tf_config: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _report(proc: subprocess.Popen, timeout: float = 120) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child timed out:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("REPORT ")]
    assert lines, out[-2000:] + err[-2000:]
    return json.loads(lines[-1][len("REPORT "):])


def test_mirrored_strategy_on_two_logical_cpus_trains_and_serves():
    report = _report(_start_child(MIRRORED_CHILD))
    # Logical CPUs share the cores: by default no mirroring across them.
    assert report["plain"].startswith("default strategy")
    assert report["type"] == "MirroredStrategy"
    assert report["replicas"] == 2
    assert "CPU:0, CPU:1" in report["mirrored"]
    assert report["variable"] == "MirroredVariable"
    assert report["trained"] and all(loss == loss for loss in report["losses"])  # not NaN
    assert report["max_diff"] < 1e-5
    assert report["stale_diff"] < 1e-5
    assert report["updated_diff"] < 1e-5
    assert report["versions"] == [1, 1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_tf_config_with_two_workers_gives_multi_worker_mirrored_strategy():
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs = [_start_child(WORKER_CHILD, json.dumps(
        {"cluster": cluster, "task": {"type": "worker", "index": i}})) for i in range(2)]
    try:
        reports = [_report(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in reports:
        assert r["describe"].startswith("MultiWorkerMirroredStrategy")
        assert r["replicas"] == 2
        # The training loop enforces the timeout; TensorFlow's own collective timeout
        # stays off (when it fires, the process can die by SIGSEGV: see _multiworker).
        assert (r["timeout"], r["tf_timeout"]) == (7, None)


def test_the_collective_timeout_defaults_to_the_environment_then_120_s(monkeypatch):
    from keras_tandem.cluster.strategy import collective_timeout

    strategy = types.SimpleNamespace()  # one that choose_strategy did not make
    monkeypatch.delenv("KERAS_TANDEM_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout(strategy) == 120
    monkeypatch.setenv("KERAS_TANDEM_COLLECTIVE_TIMEOUT_S", "5")
    assert collective_timeout(strategy) == 5


@pytest.mark.parametrize(("tf_config", "gpus", "devices", "expected"), [
    (None, [], None, ("default", [])),
    (None, ["/GPU:0"], None, ("one_device", ["/GPU:0"])),
    (None, ["/GPU:0", "/GPU:1"], None, ("mirrored", ["/GPU:0", "/GPU:1"])),
    (None, [], ["/cpu:0", "/cpu:1"], ("mirrored", ["/cpu:0", "/cpu:1"])),
    (None, ["/GPU:0", "/GPU:1"], ["/GPU:1"], ("one_device", ["/GPU:1"])),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}',
     ["/GPU:0"], None, ("multi_worker", [])),
    ('{"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "chief"}}',
     [], None, ("multi_worker", [])),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}',
     ["/GPU:0"], None, ("one_device", ["/GPU:0"])),
    ('{"cluster": {"worker": ["a:1", "b:2"], "evaluator": ["c:3"]}, '
     '"task": {"type": "evaluator", "index": 0}}', [], None, ("default", [])),
])
def test_plan(tf_config, gpus, devices, expected):
    assert _plan(tf_config, gpus, devices) == expected


def test_plan_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="parameter servers"):
        _plan('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}}', [], None)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        _plan("not json", [], None)
    with pytest.raises(ValueError, match="no device"):
        _plan(None, [], [])
