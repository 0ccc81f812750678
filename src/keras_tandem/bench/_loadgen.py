"""HTTP load generation for `tandem bench http`, always in a separate process.

Owns: driving `wrk` (Debian's package) with a Lua script that prints a JSON
summary, and a fallback keep-alive client in pure Python (asyncio, one
connection per task) for machines without `wrk`. Both send the same POST
body over N persistent connections for a fixed time and report requests,
latency percentiles and errors in the same shape. Run as a module
(`python -m keras_tandem.bench._loadgen`) it is the fallback client itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("TANDEM_BODY_FILE"), "rb")
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'TANDEM_JSON {"requests": %d, "duration_s": %.6f, "p50_ms": %.4f, "p99_ms": %.4f, '
    .. '"mean_ms": %.4f, "max_ms": %.4f, "errors_connect": %d, "errors_read": %d, '
    .. '"errors_write": %d, "errors_status": %d, "errors_timeout": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.mean / 1e3, latency.max / 1e3,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def which_loadgen(preference: str = "auto") -> str:
    """`"wrk"` if asked for or found on PATH (with `auto`), else `"python"`.

    Raises:
        RuntimeError: `wrk` was asked for and is not installed.
    """
    if preference == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if preference == "wrk":
        raise RuntimeError("wrk is not installed (apt-get install -y wrk), or use "
                           "--loadgen python.")
    return "python"


def run_load(tool: str, url: str, body: bytes, connections: int, duration_s: float,
             timeout_s: float = 30.0) -> dict[str, Any]:
    """Drives `url` with POSTs of `body` from a separate process.

    Args:
        tool: `"wrk"` or `"python"`.
        url: the full URL to POST to.
        body: the request body (JSON).
        connections: concurrent keep-alive connections.
        duration_s: how long to send.
        timeout_s: a request not answered in this time counts as an error.

    Returns:
        `requests`, `duration_s`, `req_per_s`, `p50_ms`, `p99_ms`, `mean_ms`,
        `max_ms` and `errors` (connect, read, write, timeout, non-2xx).
    """
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(body)
        body_file = f.name
    try:
        if tool == "wrk":
            out = _run_wrk(url, body_file, connections, duration_s, timeout_s)
        else:
            cmd = [sys.executable, "-m", "keras_tandem.bench._loadgen", "--url", url,
                   "--body-file", body_file, "--connections", str(connections),
                   "--duration", str(duration_s), "--timeout", str(timeout_s)]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=duration_s + timeout_s + 60)
            out = _parse_summary(proc.stdout, proc.stderr)
    finally:
        os.unlink(body_file)
    out["errors"] = sum(out.pop(k) for k in list(out) if k.startswith("errors_"))
    out["req_per_s"] = out["requests"] / out["duration_s"] if out["duration_s"] else 0.0
    return out


def _run_wrk(url: str, body_file: str, connections: int, duration_s: float,
             timeout_s: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA)
        script = f.name
    try:
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={max(1, round(timeout_s))}s", "-s", script, url]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "TANDEM_BODY_FILE": body_file},
                              timeout=duration_s + timeout_s + 60)
    finally:
        os.unlink(script)
    return _parse_summary(proc.stdout, proc.stderr)


def _parse_summary(stdout: str, stderr: str, what: str = "the load generator") -> dict[str, Any]:
    """The `TANDEM_JSON {...}` line a load-generator process printed, decoded."""
    for line in stdout.splitlines():
        if line.startswith("TANDEM_JSON "):
            return json.loads(line[len("TANDEM_JSON "):])
    raise RuntimeError(f"{what} printed no summary.\nstdout: {stdout[-2000:]}\n"
                       f"stderr: {stderr[-2000:]}")


# ------------------------------------------------ the Python fallback client


async def _connection(host: str, port: int, request: bytes, stop_at: float, timeout_s: float,
                      latencies: list[float], errors: dict[str, int]) -> None:
    now = time.perf_counter
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        errors["errors_connect"] += 1
        return
    try:
        while now() < stop_at:
            t0 = now()
            writer.write(request)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
            except asyncio.TimeoutError:
                errors["errors_timeout"] += 1
                return
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                errors["errors_read"] += 1
                return
            latencies.append(now() - t0)
            if not head.startswith(b"HTTP/1.1 2"):
                errors["errors_status"] += 1
    finally:
        writer.close()


async def _drive(url: str, body: bytes, connections: int, duration_s: float,
                 timeout_s: float) -> dict[str, Any]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname, u.port or 80
    path = u.path + (f"?{u.query}" if u.query else "")
    request = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    latencies: list[float] = []
    errors = dict.fromkeys(["errors_connect", "errors_read", "errors_write", "errors_status",
                            "errors_timeout"], 0)
    start = time.perf_counter()
    stop_at = start + duration_s
    await asyncio.gather(*(_connection(host, port, request, stop_at, timeout_s, latencies,
                                       errors) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))] * 1e3

    return {"requests": len(latencies), "duration_s": elapsed, "p50_ms": pct(50),
            "p99_ms": pct(99),
            "mean_ms": sum(latencies) / len(latencies) * 1e3 if latencies else 0.0,
            "max_ms": latencies[-1] * 1e3 if latencies else 0.0, **errors}


def main(argv: list[str] | None = None) -> int:
    """The fallback client: prints one `TANDEM_JSON {...}` summary line."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--body-file", required=True)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    with open(a.body_file, "rb") as f:
        body = f.read()
    summary = asyncio.run(_drive(a.url, body, a.connections, a.duration, a.timeout))
    print("TANDEM_JSON " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
