"""Talking to a server in a test: one HTTP request, a free port, `tandem serve` in a child.

Every server a test reaches is on 127.0.0.1; a request goes on a fresh
connection and is closed after its answer.
"""

import contextlib
import http.client
import json
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field


def request(server, method, path, body=None, headers=None, timeout=30, raw=False):
    """(status, headers, body) of one request on a fresh connection.

    Args:
        server: a port on 127.0.0.1, or a URL such as "http://127.0.0.1:8501".
        method: "GET", "POST", ...
        path: the request path, e.g. "/v1/models/m:predict".
        body: None, bytes (sent as they are), or anything else (sent as JSON).
        headers: extra request headers.
        timeout: the socket timeout, in seconds.
        raw: give the body as the bytes received, rather than parsed JSON
            (when the Content-Type says JSON) or text.
    """
    if isinstance(server, str):
        host, port = server.removeprefix("http://").split("/")[0].split(":")
    else:
        host, port = "127.0.0.1", server
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        got = r.read()
        if not raw:
            ctype = r.getheader("Content-Type", "")
            got = json.loads(got) if "json" in ctype else got.decode()
        return r.status, dict(r.getheaders()), got
    finally:
        conn.close()


def read_reply(sock):
    """The bytes of one HTTP reply with a JSON body, read from `sock` (or until it closes)."""
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply


def free_port():
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CliServer:
    """A `tandem serve` child: its process, its port, and its output up to "serving"."""

    proc: subprocess.Popen
    port: int
    lines: list = field(default_factory=list)


@contextlib.contextmanager
def cli_serve(path, *args, port=None, cwd=None):
    """Runs `python -m keras_tandem.cli serve PATH --port PORT ARGS...` for a `with` block.

    Reads its output until a line starting with "serving" (or until the
    process ends, so a server that fails to start is not waited for), yields
    a `CliServer`, and on leaving sends SIGINT, killing it if it has not
    exited within 30 s; `proc.returncode` then says how it ended.

    Args:
        path: the model file or base directory to serve.
        *args: further command-line arguments.
        port: the port; a free one by default (0: the server picks one).
        cwd: the working directory of the child.
    """
    port = free_port() if port is None else port
    proc = subprocess.Popen(
        [sys.executable, "-m", "keras_tandem.cli", "serve", str(path), "--port", str(port),
         *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = CliServer(proc, port)
    try:
        for line in proc.stdout:  # ends when the process does
            server.lines.append(line)
            if line.startswith("serving"):
                break
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
