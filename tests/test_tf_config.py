"""TF_CONFIG: the one parser, `cluster_position`, and what `keras_tandem` exports for clusters."""

import json
import subprocess
import sys
import types

import pytest

import keras_tandem
from keras_tandem import WorkerLost, cluster_position
from keras_tandem.cluster.strategy import _plan
from keras_tandem.cluster.tf_config import ClusterPosition

CHIEF_AND_WORKERS = {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2", "127.0.0.1:3"]}
WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


def _config(cluster, task=None):
    config = {"cluster": cluster}
    if task is not None:
        config["task"] = task
    return json.dumps(config)


@pytest.fixture
def tf_config(monkeypatch):
    def set_(text):
        monkeypatch.setenv("TF_CONFIG", text)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    return set_


def test_without_tf_config_a_process_is_the_chief_of_one(tf_config):
    position = cluster_position()
    assert position == (0, 1, True)
    assert (position.index, position.workers, position.is_chief) == (0, 1, True)
    tf_config("")
    assert cluster_position() == ClusterPosition(0, 1, True)


@pytest.mark.parametrize(("cluster", "task", "expected"), [
    # The chief is counted among the workers, first.
    (CHIEF_AND_WORKERS, {"type": "chief", "index": 0}, (0, 3, True)),
    (CHIEF_AND_WORKERS, {"type": "worker", "index": 0}, (1, 3, False)),
    (CHIEF_AND_WORKERS, {"type": "worker", "index": 1}, (2, 3, False)),
    # Without a chief task, worker 0 is the chief.
    (WORKERS, {"type": "worker", "index": 0}, (0, 2, True)),
    (WORKERS, {"type": "worker", "index": 1}, (1, 2, False)),
    (WORKERS, {"type": "worker", "index": "1"}, (1, 2, False)),
    (WORKERS, None, (0, 2, True)),  # no task: worker 0
    # An evaluator trains alone and is not the chief.
    ({**WORKERS, "evaluator": ["127.0.0.1:9"]}, {"type": "evaluator", "index": 0},
     (0, 1, False)),
    ({}, {"type": "worker", "index": 0}, (0, 1, True)),  # an empty cluster: alone
])
def test_cluster_position_from_tf_config(tf_config, cluster, task, expected):
    tf_config(_config(cluster, task))
    assert cluster_position() == expected


@pytest.mark.parametrize(("text", "match"), [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object with a 'cluster'"),
    ('{"cluster": ["a:1"]}', "JSON object with a 'cluster'"),
    (_config(WORKERS, ["worker", 0]), "'task' must be an object"),
    (_config({"ps": ["a:1"], "worker": ["b:2"]}, {"type": "worker", "index": 0}),
     "parameter servers"),
    (_config(WORKERS, {"type": "ps", "index": 0}), "not supported"),
    (_config(WORKERS, {"type": "worker", "index": 2}), "worker 2 is not in its cluster"),
    (_config(WORKERS, {"type": "chief", "index": 0}), "chief 0 is not in its cluster"),
    (_config(WORKERS, {"type": "worker", "index": "one"}), "must be an integer"),
])
def test_a_malformed_tf_config_is_refused_with_a_clear_error(tf_config, text, match):
    tf_config(text)
    with pytest.raises(ValueError, match=match):
        cluster_position()


@pytest.mark.parametrize(("cluster", "task"), [
    (WORKERS, {"type": "worker", "index": 1}),
    (CHIEF_AND_WORKERS, {"type": "chief", "index": 0}),
    (CHIEF_AND_WORKERS, {"type": "worker", "index": 1}),
])
def test_a_strategy_s_cluster_resolver_follows_the_same_rules(tf_config, cluster, task):
    import tensorflow as tf

    tf_config(_config(cluster, task))
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task["type"], task_id=task["index"])
    assert cluster_position(types.SimpleNamespace(cluster_resolver=resolver)) == \
        cluster_position()
    # A strategy without a resolver (one machine) reads TF_CONFIG, as with none.
    assert cluster_position(tf.distribute.get_strategy()) == cluster_position()


@pytest.mark.parametrize("text", [
    None,
    _config(WORKERS, {"type": "worker", "index": 1}),
    _config({"worker": ["a:1"]}, {"type": "worker", "index": 0}),
    _config(CHIEF_AND_WORKERS, {"type": "worker", "index": 0}),
    _config({"chief": ["a:1"]}, {"type": "chief", "index": 0}),
    _config({**WORKERS, "evaluator": ["c:3"]}, {"type": "evaluator", "index": 0}),
])
def test_choose_strategy_and_cluster_position_read_tf_config_alike(tf_config, text):
    if text is not None:
        tf_config(text)
    multi_worker = _plan(text, gpus=[], devices=None)[0] == "multi_worker"
    assert multi_worker == (cluster_position().workers > 1)


def test_cluster_position_does_not_load_tensorflow():
    code = ("import sys, keras_tandem\n"
            "print(tuple(keras_tandem.cluster_position()))\n"
            "print('tensorflow' in sys.modules)\n")
    env_config = _config(WORKERS, {"type": "worker", "index": 1})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True, env={"TF_CONFIG": env_config,
                                                      "PATH": "/usr/bin:/bin"}).stdout
    assert out.split("\n")[:2] == ["(1, 2, False)", "False"]


def test_worker_lost_and_cluster_position_are_public():
    assert {"WorkerLost", "cluster_position"} <= set(keras_tandem.__all__)
    from keras_tandem.errors import WorkerLost as from_errors
    from keras_tandem.training import _multiworker

    assert WorkerLost is from_errors is _multiworker.WorkerLost
    assert issubclass(WorkerLost, RuntimeError)
