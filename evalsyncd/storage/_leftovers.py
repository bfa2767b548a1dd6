"""Where a cleanup failed: the URLs of GCS compose deltas and S3 multipart uploads that a
failed delete or abort left behind, so that a long-running caller reaps them once they
are old enough (:mod:`evalsyncd.storage.reap`) instead of waiting for its next
periodic reap. Process-wide, thread-safe, bounded (the newest 1,024 URLs)."""

from __future__ import annotations

import threading
import time
from typing import Final

__all__ = ["last_left", "note_left"]

_LEFT_MAX: Final = 1024
_left_lock = threading.Lock()
_left: dict[str, float] = {}  # URL of a leftover -> Unix time its cleanup failed


def note_left(url: str, *, at: float | None = None) -> None:
    """Note that the cleanup of ``url`` (a compose delta, a multipart upload's key) failed
    at Unix time ``at`` (default: now)."""
    with _left_lock:
        _left.pop(url, None)
        _left[url] = time.time() if at is None else at
        while len(_left) > _LEFT_MAX:
            del _left[next(iter(_left))]


def last_left(url: str) -> float | None:
    """Unix time of the newest failed cleanup under the prefix ``url`` (a storage's
    :meth:`~evalsyncd.storage.Storage.url`), or ``None``."""
    lead = url.rstrip("/") + "/"
    with _left_lock:
        times = [t for u, t in _left.items() if u.startswith(lead)]
    return max(times) if times else None
