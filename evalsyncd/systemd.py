"""systemd's notification protocol (``sd_notify``), without a dependency.

Each call sends one datagram to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace), as
documented in sd_notify(3). Outside systemd (no ``NOTIFY_SOCKET``) it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket

__all__ = ["Notifier", "watchdog_interval_s"]


class Notifier:
    """Sends ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1`` to systemd.

    Args:
        address: the socket path; default ``$NOTIFY_SOCKET``.
    """

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the event loop: if the receiver's queue is full, drop the line.
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured."""
        return self._sock is not None

    def __call__(self, line: str) -> None:
        """Send one notification line; errors are ignored (systemd may be gone or busy)."""
        if self._sock is None or self._address is None:
            return
        with contextlib.suppress(OSError):
            self._sock.sendto(line.encode(), self._address)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when systemd's watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
