"""Reporting shared by every `tandem bench` scenario.

A scenario measures rows (one per technique and setting) and ratios (named
figures such as `throughput_vs_handoff`). This module prints them as a rich
table and as `name=value` lines (easy to grep), and writes the JSON file with
the machine's description, so that runs on different boxes can be compared.
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


def machine_info() -> dict[str, Any]:
    """Cores, Python, TensorFlow and Keras versions, and the date of the run."""
    import keras
    import tensorflow as tf

    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": len(tf.config.list_physical_devices("GPU")),
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
    """Writes the run's rows, ratios, configuration and machine to `path`."""
    doc = {"scenario": scenario, "machine": machine_info(), "config": config,
           "rows": list(rows), "ratios": ratios, **extra}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=float)
    console.print(f"wrote {path}")
