"""Waiting for a state in a test: poll it with a deadline, never sleep a guessed time.

A sleep long enough on a quiet machine is too short on a loaded one, and too
long everywhere else; a poll returns as soon as the state is reached and
fails with a message when it never is.
"""

import time
from collections.abc import Callable
from typing import Any

_INTERVAL_S = 0.005
_MAX_INTERVAL_S = 0.05


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0,
               message: str = "the condition never became true") -> Any:
    """Polls `predicate` until it returns something true, and returns that.

    Args:
        predicate: called with no arguments, from this thread.
        timeout_s: how long to keep polling: a bound for a broken test, not
            a measurement, so make it generous.
        message: what was being waited for, for the failure.

    Returns:
        The first true value `predicate` returned.

    Raises:
        AssertionError: `predicate` was still false after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    interval = _INTERVAL_S
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (polled for {timeout_s} s)")
        time.sleep(interval)
        interval = min(2 * interval, _MAX_INTERVAL_S)
