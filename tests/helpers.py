"""Helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable

from evalsyncd.errors import TransientStorageError


def wait_for(
    condition: Callable[[], object],
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
    what: str = "",
) -> object:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout_s`` seconds.

    A condition that fails an ``assert`` or meets a transient storage error (a
    server that just restarted answers 500 for a moment) is asked again."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (AssertionError, TransientStorageError) as exc:
            last_exc, value = exc, None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what or condition}"
    ) from last_exc
