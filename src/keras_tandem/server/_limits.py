"""The server's resource limits: their defaults from the machine, the byte budget, quiet logs.

Owns: the defaults of `max_inflight_bytes` (a share of the memory the
process may use: the cgroup limit or the physical memory) and of
`max_connections` (the file-descriptor limit less what is open and a
reserve for model loading and checkpoints); `InflightBytes`, the budget of
request bytes being read, decoded and served at once; and `RateLimitedLog`,
which turns a flood of identical log lines (accept errors, tracebacks) into
one line with a count per interval; `release_free_memory`, which hands
the heap's free pages back to the system after large requests. No HTTP, no
asyncio.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    import resource
except ImportError:  # Windows: no descriptor limit to read or raise
    resource = None  # type: ignore[assignment]

# Request bytes in flight may take this share of the memory the process may use:
# a request costs about twice its body at its peak, and training shares the box.
_MEMORY_SHARE = 1 / 8
# Descriptors kept free for what is not a connection (model files, checkpoints,
# TensorFlow's own): this many, or this share of the limit if larger.
FD_RESERVE, FD_RESERVE_SHARE = 64, 1 / 10
_MAX_DEFAULT_CONNECTIONS = 10_000


def _malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Returns the C heap's free pages to the system (glibc's `malloc_trim`; else nothing).

    A large request's buffers are freed when it is answered, but glibc keeps
    the freed heap (one arena per thread that decoded a body) mapped, so the
    process's RSS stayed hundreds of MiB higher after a burst of large
    requests until something else reused it.
    """
    if _TRIM is not None:
        _TRIM(0)


def memory_limit_bytes() -> int | None:
    """The memory this process may use: the cgroup limit if set, else the physical memory."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            limits.append(int(text))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(limits) if limits else None


def default_max_inflight_bytes(max_body_bytes: int) -> int:
    """An eighth of `memory_limit_bytes()`, and at least one largest body."""
    memory = memory_limit_bytes()
    share = int(memory * _MEMORY_SHARE) if memory else 1 << 30
    return max(share, int(max_body_bytes))


def open_fd_count() -> int:
    """How many file descriptors this process has open (an estimate where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def raise_fd_limit(most: int = 65536) -> int:
    """Raises the soft file-descriptor limit to the hard one (at most `most`), as Go does.

    For `tandem serve`, which owns its process: the usual soft limit of 1024
    would leave fewer than 900 connections after the reserve.

    Returns:
        The soft limit now.
    """
    if resource is None:
        return most
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def default_max_connections() -> int:
    """The soft fd limit less the descriptors open now and a reserve, at least 1."""
    if resource is None:
        return _MAX_DEFAULT_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_DEFAULT_CONNECTIONS
    reserve = max(FD_RESERVE, int(soft * FD_RESERVE_SHARE))
    return max(1, min(_MAX_DEFAULT_CONNECTIONS, soft - open_fd_count() - reserve))


class InflightBytes:
    """A budget of request bytes being read, decoded and answered at once.

    A request is admitted when its bytes fit in what is left, or when nothing
    else is in flight (so one request as large as the body limit always gets
    through). Used from the event loop only.

    Args:
        limit: the most bytes in flight.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0

    def take(self, n: int) -> bool:
        """Reserves `n` bytes; False (nothing reserved) when they do not fit."""
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Returns `n` bytes reserved by `take`."""
        self.used -= n


class RateLimitedLog:
    """Logs the first of a kind of message per interval, and counts the rest.

    The next message of that kind after the interval (or `flush()`) adds
    "(N more like this in the last S s)".

    Args:
        logger: where the lines go.
        interval_s: the shortest time between two lines of one kind.
        clock: monotonic seconds (a fake one in tests).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[str, list[Any]] = {}  # kind -> [last line time, suppressed, level, msg]

    def log(self, kind: str, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        """Logs `msg % args` at `level`, unless a line of `kind` went out within the interval."""
        now = self._clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                return
            suppressed = entry[1] if entry is not None else 0
            self._kinds[kind] = [now, 0, level, msg % args if args else msg]
        if suppressed:
            msg = f"{msg} ({suppressed} more like this in the last {self.interval_s:g} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)

    def flush(self) -> None:
        """Writes the count of every kind whose interval is over and that has one."""
        now = self._clock()
        with self._lock:
            due = [(kind, e) for kind, e in self._kinds.items()
                   if e[1] and now - e[0] >= self.interval_s]
            for kind, e in due:
                self._kinds[kind] = [now, 0, e[2], e[3]]
        for _, (_, suppressed, level, msg) in due:
            self.logger.log(level, "%s (%d more like this in the last %g s)", msg, suppressed,
                            self.interval_s)
