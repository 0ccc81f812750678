"""tf.data service servers: `tandem data-service dispatcher|worker`, and helpers to start them.

Owns starting the servers (`start_dispatcher`, `start_worker`) with the
settings that matter (a fault-tolerant dispatcher journals to a work
directory; a worker's address template uses the lowercase `%port%`, since
`%PORT%` makes it hang for ever) and the command that runs one until it is
stopped. Sending a pipeline to the service is `make_pipeline(..., service=...)`'s
(pipeline.py); TensorFlow owns the service itself.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path
from typing import Any


def _address(target: str) -> str:
    """`host:port` from `grpc://host:port` or `host:port`."""
    return target.split("://", 1)[-1]


def _reachable_host(dispatcher: str) -> str:
    """This machine's address on the route to `dispatcher`.

    The dispatcher hands a worker's address to every trainer, so the worker
    must advertise one that other machines reach: the address of the
    interface that routes to the dispatcher (127.0.0.1 for a local one)
    serves trainers on the dispatcher's network. Connecting a UDP socket
    sends nothing; it only asks the kernel for the route. Falls back to the
    fully qualified host name when the dispatcher's host does not resolve.
    """
    host, _, port = _address(dispatcher).rpartition(":")
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(addr)
            local = s.getsockname()[0]
    except (OSError, ValueError):
        return socket.getfqdn()
    return f"[{local}]" if ":" in local else local


def start_dispatcher(port: int = 0, work_dir: str | Path | None = None, *,
                     fault_tolerant: bool | None = None) -> Any:
    """Starts a tf.data service dispatcher in this process.

    Args:
        port: the port to listen on; 0 picks a free one.
        work_dir: a folder where the dispatcher journals its state, so that a
            restarted dispatcher (same port, same folder) carries on.
        fault_tolerant: journal to `work_dir` (default: whenever it is given).

    Returns:
        The `tf.data.experimental.service.DispatchServer`; its `target`
        (`grpc://host:port`) is the `service=` for `make_pipeline`.

    Raises:
        ValueError: fault tolerance asked for without a work directory.
    """
    import tensorflow as tf

    if fault_tolerant is None:
        fault_tolerant = work_dir is not None
    if fault_tolerant and work_dir is None:
        raise ValueError("A fault-tolerant dispatcher needs work_dir= (it journals there).")
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    config = tf.data.experimental.service.DispatcherConfig(
        port=int(port), work_dir=None if work_dir is None else str(work_dir),
        fault_tolerant_mode=bool(fault_tolerant))
    return tf.data.experimental.service.DispatchServer(config)


def start_worker(dispatcher: str, port: int = 0, *, host: str | None = None,
                 worker_address: str | None = None) -> Any:
    """Starts a tf.data service worker in this process.

    Args:
        dispatcher: the dispatcher's address, `host:port` or `grpc://host:port`.
        port: the port to listen on; 0 picks a free one.
        host: the host name or address the dispatcher and trainers reach
            this worker at (default: this machine's address on the route to
            the dispatcher; 127.0.0.1 for a dispatcher on this machine).
        worker_address: the full address template instead, e.g.
            `"10.0.0.7:%port%"` (lowercase `%port%` is replaced by the port).

    Returns:
        The `tf.data.experimental.service.WorkerServer`.

    Raises:
        ValueError: the template uses `%PORT%`, which TensorFlow never
            replaces (the worker would hang for ever).
    """
    import tensorflow as tf

    address = worker_address or f"{host or _reachable_host(dispatcher)}:%port%"
    if "%PORT%" in address:
        raise ValueError(f"worker_address {address!r}: write the placeholder in lowercase, "
                         "'%port%'; TensorFlow does not replace '%PORT%' and the worker hangs.")
    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=_address(dispatcher), worker_address=address, port=int(port))
    return tf.data.experimental.service.WorkerServer(config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds `tandem data-service dispatcher|worker` and their options."""
    roles = parser.add_subparsers(dest="role", required=True)
    d = roles.add_parser("dispatcher", help="the dispatcher: hands out splits, tracks workers")
    d.add_argument("--port", type=int, default=5050, help="port to listen on (default 5050)")
    d.add_argument("--work-dir", default=None,
                   help="journal folder: makes the dispatcher fault-tolerant (restart it "
                        "with the same port and folder)")
    w = roles.add_parser("worker", help="a worker: runs the pipelines it is sent")
    w.add_argument("--dispatcher", required=True, help="the dispatcher's HOST:PORT")
    w.add_argument("--port", type=int, default=0, help="port to listen on (default: any free)")
    w.add_argument("--host", default=None,
                   help="the host name or address trainers reach this worker at (default: "
                        "this machine's address on the route to the dispatcher, so "
                        "127.0.0.1 only when the dispatcher is on this machine)")
    for p in (d, w):
        p.add_argument("--for", dest="for_s", type=float, default=None, metavar="S",
                       help="stop after S seconds (default: until interrupted)")


def run(args: argparse.Namespace) -> int:
    """Starts the server asked for and keeps it up until interrupted."""
    if args.role == "dispatcher":
        server = start_dispatcher(args.port, args.work_dir)
        ft = f", fault-tolerant, journal in {args.work_dir}" if args.work_dir else ""
        print(f"tf.data service dispatcher at {server.target}{ft}", flush=True)
    else:
        host = args.host or _reachable_host(args.dispatcher)
        server = start_worker(args.dispatcher, args.port, host=host)
        port = args.port or "a free port"
        print(f"tf.data service worker on {host}, {port}, for dispatcher "
              f"{args.dispatcher}", flush=True)
    deadline = None if args.for_s is None else time.monotonic() + args.for_s
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0
