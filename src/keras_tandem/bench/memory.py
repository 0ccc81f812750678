"""Server memory under large requests: peak RSS over the baseline per byte in flight.

Owns the `tandem bench memory` scenario: saves the MLP (784-256-256-10) to a
`.keras` file, starts `tandem serve` on it in a child process, and sends it
one large valid row-format request (60 MiB by default), then several at
once (8). For each case it reads the child's peak RSS (`VmHWM` of
`/proc/PID/status`, reset through `/proc/PID/clear_refs` before the case)
and reports the peak over the RSS before the case, as a multiple of the
request bytes in flight; and what stayed allocated after the answers (the
lowest RSS over the next 2 s).
Linux only (it reads `/proc`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from keras_tandem.bench._models import build_model
from keras_tandem.bench._report import console, print_ratios, print_table, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this scenario's options to `parser`."""
    parser.add_argument("--body-mb", type=float, default=60.0,
                        help="size of each request body in MiB (default 60)")
    parser.add_argument("--concurrent", type=int, default=8,
                        help="requests sent at once in the second case (default 8)")
    parser.add_argument("--quick", action="store_true",
                        help="8 MiB bodies, 4 at once")
    parser.add_argument("--json", metavar="PATH", help="write the rows and ratios to PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def _settled_rss(pid: int, seconds: float = 2.0) -> int:
    """The lowest RSS over `seconds`: the server frees and trims just after answering."""
    lowest = _proc_status(pid, "VmRSS")
    for _ in range(int(seconds / 0.1)):
        time.sleep(0.1)
        lowest = min(lowest, _proc_status(pid, "VmRSS"))
    return lowest


def _post(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/models/mlp:predict", body=body,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def _body(n_bytes: int) -> bytes:
    rng = np.random.default_rng(0)
    row = json.dumps(np.round(rng.random(784), 4).tolist()).encode()
    rows = max(1, n_bytes // (len(row) + 1))
    return b'{"instances": [' + b",".join([row] * rows) + b"]}"


def _case(name: str, pid: int, port: int, body: bytes, concurrent: int) -> dict[str, Any]:
    base = _proc_status(pid, "VmRSS")
    _reset_peak(pid)
    statuses: list[int] = []
    threads = [threading.Thread(target=lambda: statuses.append(_post(port, body)))
               for _ in range(concurrent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = _proc_status(pid, "VmHWM") - base
    after = _settled_rss(pid) - base
    admitted = sum(s == 200 for s in statuses)
    in_flight = len(body) * max(1, admitted)
    row = {"case": name, "body_mib": len(body) / 2**20, "sent": concurrent,
           "answered_200": admitted, "refused_503": sum(s == 503 for s in statuses),
           "peak_over_base_mib": peak / 2**20, "peak_per_byte_in_flight": peak / in_flight,
           "retained_mib": after / 2**20, "other_status": sorted(
               {s for s in statuses if s not in (200, 503)})}
    console.print(f"  {name}: peak {row['peak_over_base_mib']:.0f} MiB over the baseline = "
                  f"{row['peak_per_byte_in_flight']:.2f}x the bytes in flight "
                  f"({admitted} x {row['body_mib']:.0f} MiB answered); retained "
                  f"{row['retained_mib']:.0f} MiB")
    return row


def run(args: argparse.Namespace) -> int:
    """Runs the scenario; returns 0, or 1 if a request failed or the server died."""
    body_mb, concurrent = (8.0, 4) if args.quick else (args.body_mb, args.concurrent)
    body = _body(int(body_mb * 2**20))
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.keras"
        build_model("mlp").save(path)
        cmd = [sys.executable, "-m", "keras_tandem.cli", "serve", str(path), "--port",
               str(port), "--max-body-mb", str(body_mb * 1.1 + 1),
               "--max-inflight-bytes", str(len(body) * concurrent)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        try:
            line = proc.stdout.readline()
            if not line.startswith("serving"):
                raise RuntimeError(f"tandem serve did not start (printed {line!r})")
            _post(port, _body(1 << 20))  # warm every path, including the large-body one
            rows = [_case("one request", proc.pid, port, body, 1),
                    _case(f"{concurrent} at once", proc.pid, port, body, concurrent)]
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(60)
    columns = ["case", "body_mib", "sent", "answered_200", "refused_503",
               "peak_over_base_mib", "peak_per_byte_in_flight", "retained_mib"]
    print_table("Server memory, large row-format requests (MLP 784-256-256-10)", rows, columns)
    ratios = {"peak_per_byte_one": rows[0]["peak_per_byte_in_flight"],
              "peak_per_byte_concurrent": rows[1]["peak_per_byte_in_flight"],
              "retained_mib_after_concurrent": rows[1]["retained_mib"]}
    print_ratios(ratios)
    if args.json:
        write_json(args.json, "memory", {"body_mib": body_mb, "concurrent": concurrent}, rows,
                   ratios)
    failed = any(r["other_status"] or not r["answered_200"] for r in rows)
    return 1 if failed or not alive else 0
