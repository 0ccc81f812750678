"""`tandem serve MODEL`: the command-line front of `keras_tandem.serve`.

Owns argument parsing (TF Serving's flags under our names: see README,
"Moving from TF Serving"), logging setup and waiting for Ctrl-C / SIGTERM;
the server itself is `serve()`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from keras_tandem.server._serve import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `tandem serve`'s options to `parser`."""
    parser.add_argument("model", nargs="?",
                        help="a .keras file, a SavedModel directory, or a base directory with "
                             "numbered version subdirectories (BASE/1/model.keras, "
                             "BASE/2/saved_model.pb, ...); leave out with --model-config-file")
    parser.add_argument("--model-config-file", metavar="FILE",
                        help="serve the models of a TF Serving model config file "
                             "(model_config_list { config { name base_path "
                             "model_version_policy version_labels } }) instead of MODEL")
    parser.add_argument("--model-config-file-poll-wait-seconds", type=float, default=0,
                        metavar="N",
                        help="re-read the model config file every N seconds and apply "
                             "changes without a restart (default 0: read it once)")
    parser.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                        help="also serve TF Serving's gRPC API on PORT (TF Serving's --port; "
                             "default: no gRPC; 0 picks a free port)")
    parser.add_argument("--name", help="model name in URLs (default: the file's stem or the "
                                       "base directory's name; not with --model-config-file)")
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

    if (args.model is None) == (args.model_config_file is None):
        print("tandem serve: pass either MODEL or --model-config-file FILE"
              + (", not both" if args.model is not None else ""), file=sys.stderr)
        return 2
    if args.name and args.model_config_file:
        print("tandem serve: --name does not apply with --model-config-file (the file names "
              "the models)", file=sys.stderr)
        return 2
    raise_fd_limit()  # this process is the server's: room for connections beside the reserve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    name = None if args.model is None else args.name or default_name(args.model)
    options = {"max_batch_size": args.max_batch_size, "max_delay_ms": args.max_delay_ms,
               "queue_size": args.queue_size, "timeout_s": args.timeout_s}
    try:
        handle = serve(
            args.model, name=name, host=args.host, port=args.port,
            model_config_file=args.model_config_file,
            model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
            grpc_port=args.grpc_port, max_body_bytes=int(args.max_body_mb * 2**20),
            poll_interval_s=args.poll_interval_s, predictor_options=options,
            max_inflight_bytes=args.max_inflight_bytes, max_connections=args.max_connections,
            header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s)
    except (ValueError, RuntimeError, OSError) as e:  # what to fix, not a traceback
        logging.getLogger("keras_tandem.server").debug("serve() failed", exc_info=True)
        print(f"tandem serve: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    grpc = f", gRPC on port {handle.grpc_port}" if handle.grpc_port is not None else ""
    if name is not None:
        version = handle.version
        print(f"serving model {name!r} version "
              f"{version if version is not None else '(none yet)'} at "
              f"{handle.url}/v1/models/{name}{grpc}  (Ctrl-C stops)", flush=True)
    else:
        print(f"serving models {', '.join(map(repr, handle.models)) or '(none yet)'} from "
              f"{args.model_config_file} at {handle.url}/v1/models/NAME{grpc}  (Ctrl-C stops)",
              flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        handle.stop()
    return 0
