"""The naive HTTP server of `tandem bench http`, run in a child process.

What users write today: a stdlib `ThreadingHTTPServer` (a thread per
connection, HTTP/1.1 keep-alive, Werkzeug's listen backlog of 128) whose
handler calls `model.predict` on each request, as a threaded Flask app does.
It runs in its own process because concurrent `model.predict` calls have
aborted a whole process ("Mutex corrupt"), and so that its threads never
share an interpreter with the server under test.

Usage: python -m keras_tandem.bench._naive_http MODEL
Prints `PORT n` once listening on 127.0.0.1, and serves until stdin closes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as behind a production WSGI server
    model: Any = None

    def do_POST(self) -> None:
        import numpy as np

        try:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            x = np.asarray(json.loads(body)["instances"], dtype="float32")
            y = self.model.predict(x, verbose=0)
            payload, status = json.dumps({"predictions": y.tolist()}).encode(), 200
        except Exception as e:  # noqa: BLE001 - a naive server answers 500
            payload, status = json.dumps({"error": str(e)}).encode(), 500
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the load generator hung up (end of a run)
            self.close_connection = True

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # Werkzeug's listen backlog
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-answer are expected here


def main(argv: list[str]) -> None:
    """Serves `argv[0]` (a model name from `_models`) until stdin closes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_tandem.bench._models import build_model

    model = build_model(argv[0])
    handler = type("Handler", (_Handler,), {"model": model})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    # Exit at once: handler threads may still be inside model.predict, and
    # TensorFlow's teardown under running threads aborts noisily.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
