"""Detect an exhausted inotify watch limit, which watchdog does not report.

watchdog (6.x) registers watches for new subdirectories itself and silently
ignores a failure to add one (``ENOSPC`` once ``fs.inotify.max_user_watches``
is reached): events in such a directory are simply never seen. The daemon
therefore asks the kernel itself: for the root at startup and for every new
directory, :meth:`WatchProbe.exhausted` adds a watch on its own inotify
instance and removes it at once. ``ENOSPC`` means the limit is reached, so the
observer's watch for that directory failed too (or will fail for the next
one), and the service falls back to frequent scans (``Service.on_watch_failure``).
Cost: two system calls per new directory. Only with the watchdog observer: the
native one (``evalsyncd.sync.watcher``, inotify read on the event loop) adds its
watches itself and reports ``ENOSPC`` the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

__all__ = ["WatchProbe"]

_IN_CREATE = 0x00000100
_IN_ONLYDIR = 0x01000000
_IN_CLOEXEC = 0o2000000
_IN_NONBLOCK = 0o4000


class WatchProbe:
    """A private inotify instance used only to test whether one more watch fits.

    On systems without inotify (or if it cannot be created) every probe answers
    ``None``: nothing is known to be wrong.
    """

    def __init__(self) -> None:
        self._fd = -1
        self._libc: ctypes.CDLL | None = None
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = int(libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK))
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self._libc, self._fd = libc, fd

    def exhausted(self, directory: str | os.PathLike[str]) -> str | None:
        """A message if no watch can be added for ``directory`` because the user's
        watch limit is reached; ``None`` otherwise (also when the directory is gone)."""
        libc = self._libc
        if libc is None:
            return None
        wd = int(libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_CREATE | _IN_ONLYDIR))
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                return (
                    f"inotify watch limit reached at {os.fspath(directory)} "
                    "(raise fs.inotify.max_user_watches)"
                )
            return None
        libc.inotify_rm_watch(self._fd, wd)
        return None

    def close(self) -> None:
        """Close the private inotify instance."""
        fd, self._fd, self._libc = self._fd, -1, None
        if fd >= 0:
            os.close(fd)
