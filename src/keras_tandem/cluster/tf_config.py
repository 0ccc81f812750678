"""The one reader of `TF_CONFIG`: where this process stands in its cluster.

Separation of concerns:
- This module owns the rules: which tasks train together (the `chief`, if
  any, counted among the workers), which one is the chief (the `chief` task,
  else worker 0), what an `evaluator` is (a process that trains alone), and
  what is refused (malformed JSON, unknown task types, indices out of range,
  parameter-server clusters).
- `choose_strategy` (strategy.py) decides what to build from the worker
  count; the multi-worker training loop and user scripts ask
  `cluster_position()` for their place.

Pure Python: it never imports TensorFlow (a strategy passed in is only read
through its `cluster_resolver`), so `import keras_tandem` stays fast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

_TRAINING_TASKS = ("chief", "worker")


class ClusterPosition(NamedTuple):
    """Where this process stands among the workers that train together.

    Attributes:
        index: this worker's place among them, 0-based (the chief first
            when the cluster has a `chief` task).
        workers: how many train together (1 without a cluster).
        is_chief: whether this process is the chief: the one that keeps
            checkpoints and saved models, and the natural one to serve.
    """

    index: int
    workers: int
    is_chief: bool


_ALONE = ClusterPosition(0, 1, True)


def cluster_position(strategy: Any = None) -> ClusterPosition:
    """This process's place in its training cluster.

    Args:
        strategy: a `tf.distribute` strategy; its `cluster_resolver` says
            where this process is (a `MultiWorkerMirroredStrategy` has one).
            None, or a strategy without a resolver: read `TF_CONFIG`.

    Returns:
        A `ClusterPosition` `(index, workers, is_chief)`;
        `ClusterPosition(0, 1, True)` without `TF_CONFIG`.

    Raises:
        ValueError: `TF_CONFIG` is malformed or names a parameter-server
            cluster.

    Example:

    ```python
    strategy = choose_strategy()
    index, workers, is_chief = cluster_position(strategy)
    ```
    """
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is not None:
        return _position(resolver.cluster_spec().as_dict(), resolver.task_type,
                         resolver.task_id)
    return _parse(os.environ.get("TF_CONFIG"))


def _parse(tf_config: str | None) -> ClusterPosition:
    """The position the JSON text of `TF_CONFIG` describes (None or empty: none)."""
    if not tf_config or not tf_config.strip():
        return _ALONE
    try:
        config = json.loads(tf_config)
    except ValueError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {tf_config[:200]!r}") from e
    if not isinstance(config, Mapping) or not isinstance(config.get("cluster") or {}, Mapping):
        raise ValueError("TF_CONFIG must be a JSON object with a 'cluster' object, e.g. "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         f'"task": {{"type": "worker", "index": 0}}}}; got {tf_config[:200]!r}')
    task = config.get("task") or {}
    if not isinstance(task, Mapping):
        raise ValueError(f"TF_CONFIG's 'task' must be an object; got {task!r}.")
    return _position(config.get("cluster") or {}, task.get("type"), task.get("index"))


def _position(cluster: Mapping[str, Any], task_type: str | None,
              task_index: Any) -> ClusterPosition:
    """The rules, shared by TF_CONFIG and a strategy's cluster resolver."""
    if cluster.get("ps"):
        raise ValueError("TF_CONFIG names parameter servers ('ps'): ParameterServerStrategy "
                         "is not supported; use a cluster of 'chief' and 'worker' tasks.")
    chiefs = len(cluster.get("chief") or ())
    workers = chiefs + len(cluster.get("worker") or ())
    if workers == 0:  # no cluster to join (TensorFlow treats it as local too)
        return _ALONE
    task_type = task_type or "worker"
    if task_type == "evaluator":
        # An evaluator evaluates alone: it never joins the workers' collectives.
        return ClusterPosition(0, 1, False)
    if task_type not in _TRAINING_TASKS:
        raise ValueError(f"TF_CONFIG's task type {task_type!r} is not supported; use "
                         "'chief', 'worker' or 'evaluator'.")
    try:
        index = int(task_index or 0)
    except (TypeError, ValueError):
        raise ValueError(f"TF_CONFIG's task index must be an integer; got {task_index!r}.") \
            from None
    count = chiefs if task_type == "chief" else workers - chiefs
    if not 0 <= index < count:
        raise ValueError(f"TF_CONFIG's task {task_type} {index} is not in its cluster "
                         f"({count} {task_type} task{'s' if count != 1 else ''}).")
    if task_type == "chief":
        return ClusterPosition(index, workers, True)
    return ClusterPosition(chiefs + index, workers, chiefs == 0 and index == 0)
