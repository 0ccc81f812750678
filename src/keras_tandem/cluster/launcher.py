"""`tandem worker`: a local multi-worker cluster, one process per worker, on 127.0.0.1.

Owns the processes only: free ports, one TF_CONFIG per worker, output
forwarded line by line with a `[worker i]` prefix, and the rule that when
one worker fails (a non-zero exit, a signal) the others are stopped and the
launcher exits non-zero with a message saying who died and how to resume.
What each worker runs is a script of the user's (`--script`) or the built-in
job (`keras_tandem.cluster.job`). On real machines, set TF_CONFIG on each
and run the same script there: nothing in it is specific to this launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

_PREFIX_LOCK = threading.Lock()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` right now (bound to port 0, then released).

    Args:
        n: how many ports.
        host: the interface to bind on.

    Returns:
        The port numbers.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_configs(ports: Sequence[int], host: str = "127.0.0.1") -> list[str]:
    """One TF_CONFIG per worker of a cluster of `worker` tasks on `host:port` (task 0: chief).

    Args:
        ports: one port per worker.
        host: the workers' host.

    Returns:
        The TF_CONFIG JSON strings, in task order.
    """
    cluster = {"worker": [f"{host}:{p}" for p in ports]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
            for i in range(len(ports))]


def _parent_death_signal() -> Any:
    """A function for `preexec_fn` that makes the child die with the launcher (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded here, not after fork
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:  # pragma: no cover - runs in the child before exec
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_signal


class LocalCluster:
    """N worker processes running `command`, each with its TF_CONFIG; stops them all together.

    Each worker gets `TF_NUM_INTRAOP_THREADS` and `TF_NUM_INTEROP_THREADS`
    of cores / workers (unless set): they share this machine's cores.

    Args:
        command: the program and its arguments, the same for every worker.
        num_workers: how many workers.
        env: extra environment variables for every worker.
        out: where forwarded lines go (default: `sys.stdout` at the call);
            None keeps them only in `lines`.
    """

    def __init__(self, command: Sequence[str], num_workers: int, *,
                 env: dict[str, str] | None = None, out: TextIO | str | None = "stdout"):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.command = list(command)
        self.ports = free_ports(num_workers)
        self.lines: list[list[str]] = [[] for _ in range(num_workers)]
        self._out = sys.stdout if out == "stdout" else out
        self.procs: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        base = dict(os.environ, **(env or {}))
        base.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # The workers share this machine's cores: split them rather than oversubscribe.
        threads = str(max(1, (os.cpu_count() or 1) // num_workers))
        base.setdefault("TF_NUM_INTRAOP_THREADS", threads)
        base.setdefault("TF_NUM_INTEROP_THREADS", threads)
        base["PYTHONUNBUFFERED"] = "1"
        for i, config in enumerate(tf_configs(self.ports)):
            proc = subprocess.Popen(
                self.command, env=dict(base, TF_CONFIG=config), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                preexec_fn=_parent_death_signal())
            self.procs.append(proc)
            t = threading.Thread(target=self._forward, args=(i, proc), daemon=True,
                                 name=f"tandem-worker-{i}-output")
            t.start()
            self._readers.append(t)

    def _forward(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            if _noise(line):
                continue
            self.lines[i].append(line)
            if self._out is not None:
                with _PREFIX_LOCK:
                    print(f"[worker {i}] {line}", file=self._out, flush=True)

    def wait(self, timeout_s: float | None = None) -> tuple[int, int | None]:
        """Waits until all workers end, or one fails (then stops the others).

        Args:
            timeout_s: the most seconds to wait; then all are stopped.

        Returns:
            `(first failed worker or -1, its exit code)`; `(-1, 0)` when all
            succeeded, `(-1, None)` on timeout.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                codes = [p.poll() for p in self.procs]
                failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
                if failed is not None:
                    self.stop()
                    return failed, codes[failed]
                if all(c == 0 for c in codes):
                    self._drain()
                    return -1, 0
                if deadline is not None and time.monotonic() > deadline:
                    self.stop()
                    return -1, None
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 3.0) -> None:
        """Stops every worker still running: SIGTERM to its process group, then SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = [p for p in self.procs if p.poll() is None]
            for p in live:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
            end = time.monotonic() + grace_s
            while any(p.poll() is None for p in live) and time.monotonic() < end:
                time.sleep(0.05)
        self._drain()

    def _drain(self) -> None:
        for t in self._readers:
            t.join(2.0)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _noise(line: str) -> bool:
    # TensorFlow's start-up lines that TF_CPP_MIN_LOG_LEVEL does not silence.
    return line.startswith("WARNING: All log messages before absl::InitializeLog()") or \
        "oneDNN custom operations are on" in line


def describe_exit(code: int | None) -> str:
    """`"exit code 3"` or `"signal SIGKILL"` for a `Popen.returncode`."""
    if code is None:
        return "no exit (timed out)"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `tandem worker`: the cluster's, then the built-in job's."""
    from keras_tandem.cluster import job as cluster_job

    parser.add_argument("--num-workers", type=int, default=2,
                        help="worker processes to start on 127.0.0.1 (default 2)")
    parser.add_argument("--script", default=None,
                        help="a Python training script each worker runs instead of the "
                             "built-in job; its own arguments go after `--`")
    parser.add_argument("--collective-timeout", type=float, default=None, metavar="S",
                        help="seconds a collective may wait for a silent peer before a "
                             "worker gives up (default 120)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop the cluster after S seconds")
    cluster_job.add_arguments(parser.add_argument_group("the built-in job (no --script)"))
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="after `--`: arguments for --script")


def _job_argv(args: argparse.Namespace) -> list[str]:
    from keras_tandem.cluster import job as cluster_job

    probe = argparse.ArgumentParser(add_help=False)
    cluster_job.add_arguments(probe)
    argv: list[str] = []
    for action in probe._actions:  # our own parser: the options we just declared
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Runs the cluster until every worker ends; non-zero when one failed."""
    if args.script:
        extra = [a for a in args.script_args if a != "--"] if args.script_args else []
        command = [sys.executable, args.script, *extra]
    else:
        command = [sys.executable, "-m", "keras_tandem.cluster.job", *_job_argv(args)]
    env = {}
    if args.collective_timeout:
        env["KERAS_TANDEM_COLLECTIVE_TIMEOUT_S"] = str(args.collective_timeout)
    cluster = LocalCluster(command, args.num_workers, env=env)
    print(f"[tandem worker] {args.num_workers} workers on 127.0.0.1 ports "
          f"{', '.join(map(str, cluster.ports))}: {' '.join(command[1:])}", flush=True)
    failed, code = cluster.wait(args.timeout)
    if failed < 0 and code == 0:
        print("[tandem worker] all workers finished.", flush=True)
        return 0
    if failed < 0:
        print(f"[tandem worker] timed out after {args.timeout} s: stopped every worker.",
              file=sys.stderr, flush=True)
        return 124
    resume = getattr(args, "checkpoint_dir", None)
    hint = (f" Run the same command again to resume from the last epoch saved in {resume}."
            if resume else " Without --checkpoint-dir a new run starts from epoch 0.")
    print(f"[tandem worker] worker {failed} failed ({describe_exit(code)}): stopped the "
          f"other workers.{hint}", file=sys.stderr, flush=True)
    return 1
