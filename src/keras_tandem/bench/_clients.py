"""Closed-loop client threads: each sends one request, waits, repeats.

The same harness drives every technique, so the per-request cost of the
harness itself (a clock read and a list append) is the same in every row.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_clients(call: Callable[[Any], Any], inputs: list[Any], threads: int,
                duration_s: float) -> dict[str, Any]:
    """Runs `threads` client threads calling `call(x)` for `duration_s` seconds.

    Args:
        call: one request: takes an input, returns when it is answered.
        inputs: example inputs; thread i sends `inputs[i % len(inputs)]`.
        threads: number of client threads.
        duration_s: how long each thread keeps sending.

    Returns:
        `requests`, `rps` (answered requests per wall-clock second, until
        the last thread finished), `p50_ms`, `p99_ms`, `errors`, and
        `first_error` (type and message of one failure) when there were any.
    """
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    first_error: list[str] = []
    start = threading.Barrier(threads + 1)
    now = time.perf_counter

    def client(i: int) -> None:
        x = inputs[i % len(inputs)]
        mine = latencies[i]
        start.wait()
        end = now() + duration_s
        t = now()
        while t < end:
            try:
                call(x)
            except Exception as e:  # noqa: BLE001 - counted; the naive ways do fail
                errors[i] += 1
                if not first_error:  # on one line, without Keras' terminal colours
                    text = _ANSI.sub("", f"{type(e).__name__}: {e}")
                    first_error.append(" ".join(text.split())[:300])
            t2 = now()
            mine.append(t2 - t)
            t = t2

    pool = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    began = now()
    for t in pool:
        t.join()
    wall = now() - began
    lat = np.concatenate([np.asarray(v) for v in latencies]) if any(latencies) else np.zeros(0)
    done = len(lat) - sum(errors)
    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if len(lat) else (float("nan"),) * 2
    row = {"requests": int(done), "rps": done / wall, "p50_ms": float(p50),
           "p99_ms": float(p99), "errors": int(sum(errors))}
    if first_error:
        row["first_error"] = first_error[0]
    return row
