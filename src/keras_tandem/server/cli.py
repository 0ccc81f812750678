"""`tandem serve MODEL`: the command-line front of `keras_tandem.serve`.

Owns argument parsing, logging setup and waiting for Ctrl-C / SIGTERM; the
server itself is `serve()`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from keras_tandem.server._serve import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `tandem serve`'s options to `parser`."""
    parser.add_argument("model", help="a .keras file, a SavedModel directory, or a base "
                                      "directory with numbered version subdirectories "
                                      "(BASE/1/model.keras, BASE/2/saved_model.pb, ...)")
    parser.add_argument("--name", help="model name in URLs (default: the file's stem or the "
                                       "base directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; there is no authentication)")
    parser.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="most rows per forward pass (default 256)")
    parser.add_argument("--max-delay-ms", type=float, default=0.5,
                        help="longest wait for a batch to fill under load (default 0.5)")
    parser.add_argument("--queue-size", type=int, default=4096,
                        help="most queued requests before 503 (default 4096)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="per-request deadline before 504 (default 30)")
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help="largest request body in MiB (default 64)")
    parser.add_argument("--max-inflight-bytes", type=int, default=None,
                        help="most request bytes read, decoded and answered at once; 503 "
                             "beyond it (default: an eighth of the memory the process may "
                             "use, at least one largest body)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="most open connections; more are answered 503 and closed at once "
                             "(default: the fd limit less those open and a reserve)")
    parser.add_argument("--header-timeout-s", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="close a connection that has not sent a request's headers in "
                             "this time, idle keep-alive included (default 60)")
    parser.add_argument("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="answer 408 when a body stalls this long between two reads "
                             "(default 60)")
    parser.add_argument("--poll-interval-s", type=float, default=1.0,
                        help="how often a base directory is scanned for new versions")


def default_name(model: str) -> str:
    """The model name for a path: a file's stem, or a (base) directory's name."""
    path = Path(model).resolve()
    if path.is_file():
        return path.stem
    if path.name.isdigit() and (path / "saved_model.pb").is_file():
        return path.parent.name  # BASE/1 of a SavedModel: the model is BASE
    return path.name


def run(args: argparse.Namespace) -> int:
    """Serves until interrupted; returns the exit code."""
    from keras_tandem.server import serve
    from keras_tandem.server._limits import raise_fd_limit

    raise_fd_limit()  # this process is the server's: room for connections beside the reserve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    name = args.name or default_name(args.model)
    options = {"max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms,
               "queue_size": args.queue_size, "timeout_s": args.timeout_s}
    handle = serve(args.model, name=name, host=args.host, port=args.port,
                   max_body_bytes=int(args.max_body_mb * 2**20),
                   poll_interval_s=args.poll_interval_s, predictor_options=options,
                   max_inflight_bytes=args.max_inflight_bytes,
                   max_connections=args.max_connections,
                   header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    version = handle.version
    print(f"serving model {name!r} version {version if version is not None else '(none yet)'}"
          f" at {handle.url}/v1/models/{name}  (Ctrl-C stops)", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        handle.stop()
    return 0
