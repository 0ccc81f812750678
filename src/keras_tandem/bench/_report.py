"""Reporting shared by every `tandem bench` scenario.

A scenario measures rows (one per technique and setting) and ratios (named
figures such as `throughput_vs_handoff`). This module prints them as a rich
table and as `name=value` lines (easy to grep), and writes the JSON file with
the Keras backend and the machine's description, so that runs on different
boxes and backends can be compared. It imports no backend itself: the
versions come from the installed distributions' metadata.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
if not console.is_terminal:  # piped output: wide enough for the tables
    console = Console(highlight=False, width=150)


def backend() -> str:
    """The Keras backend this process runs on: `tensorflow`, `jax` or `torch`."""
    import keras

    return keras.backend.backend()


def requires_tensorflow(scenario: str, why: str) -> bool:
    """Says so and returns True when `scenario` cannot run on this process's backend.

    Args:
        scenario: the `tandem bench` scenario, for the message.
        why: what it needs TensorFlow for.

    Returns:
        True when the Keras backend is not TensorFlow: the caller exits with 2.
    """
    name = backend()
    if name == "tensorflow":
        return False
    console.print(f"[red]tandem bench {scenario} runs on TensorFlow only[/] ({why}); the Keras "
                  f"backend here is {name!r}. Run it with KERAS_BACKEND=tensorflow.")
    return True


def _version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _gpus(name: str) -> int:
    """GPUs the backend sees (0 when it sees none, or cannot say)."""
    try:
        if name == "jax":
            import jax

            return sum(1 for d in jax.devices() if d.platform == "gpu")
        if name == "torch":
            import torch

            return torch.cuda.device_count()
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001 - a description of the machine, never a failure
        return 0


def machine_info() -> dict[str, Any]:
    """Cores, Python, the Keras backend and the versions installed, GPUs, date of the run."""
    import keras

    name = backend()
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": name,
        "keras": keras.__version__,
        "tensorflow": _version("tensorflow"),
        "jax": _version("jax"),
        "torch": _version("torch"),
        "gpus": _gpus(name),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints rows as a table; floats get sensible precision."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("technique", "case", "name") else "right")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    console.print(table)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:,.0f}"
        if v >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def print_ratios(ratios: dict[str, float | None]) -> None:
    """Prints each ratio as a `name=value` line."""
    for name, value in ratios.items():
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{name}={shown}", flush=True)


def write_json(path: str, scenario: str, config: dict[str, Any],
               rows: Sequence[dict[str, Any]], ratios: dict[str, float | None],
               **extra: Any) -> None:
    """Writes the run's rows, ratios, configuration, backend and machine to `path`."""
    machine = machine_info()
    doc = {"scenario": scenario, "backend": machine["backend"], "machine": machine,
           "config": config,
           "rows": list(rows), "ratios": ratios, **extra}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=float)
    console.print(f"wrote {path}")
