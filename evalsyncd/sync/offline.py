"""What ``status``, ``verify`` and the service share, without the running daemon.

The journal's file name, the one count of a file's unacknowledged bytes, the
backlog it adds up to, how a destination's storage is opened from its settings,
and whether the root is the directory the journal mirrored. Importing this module
loads neither watchdog nor the daemon's core, so ``evalsyncd status`` and
``evalsyncd verify`` start fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evalsyncd.config import DestinationSettings, for_scheme
from evalsyncd.storage import Backend, parse_url
from evalsyncd.sync.files import FileKind, dir_identity, has_entries
from evalsyncd.sync.journal import Entry, EntryStatus, Journal
from evalsyncd.sync.lines import complete_end, divergence

__all__ = ["JOURNAL_NAME", "Backlog", "open_destination_storage", "root_replaced", "unacked_bytes"]

JOURNAL_NAME = "journal.sqlite3"
"""The journal's file name in the state directory."""


def root_replaced(root: Path, journal: Journal) -> bool:
    """Whether ``root`` is not the directory ``journal`` mirrored: another device and
    inode than the journal recorded (meta ``root_id``); or, with nothing recorded (a
    journal of an older version), an empty directory while the journal has live rows
    (a volume's mount point, most likely). ``False`` when the root is missing."""
    now = dir_identity(root)
    if now is None:
        return False
    known = journal.root_identity()
    if known is None:
        return not has_entries(root) and journal.has_live_rows()
    return now != known


def open_destination_storage(dest: DestinationSettings) -> Backend:
    """The storage backend of a destination, configured from its settings (no I/O).

    The URL's scheme picks the backend (:data:`evalsyncd.storage.urls.SCHEMES`)
    and its settings class (:data:`evalsyncd.config.DESTINATION_SETTINGS`), whose
    :meth:`~evalsyncd.config.DestinationSettings.storage_options` are the
    backend's constructor arguments.
    """
    return parse_url(dest.url, strict=True).open(**for_scheme(dest).storage_options())


def unacked_bytes(full: Path, kind: FileKind, st: os.stat_result, entry: Entry | None) -> int:
    """Bytes of one file its destination has not acknowledged yet, as the daemon will send them.

    The one count of the service's backlog (metrics, ``STATUS=``) and of ``evalsyncd status``.

    Args:
        full: the file's absolute path.
        kind: its kind (:func:`~evalsyncd.sync.files.classify`).
        st: its stat.
        entry: its journal row at the destination, or ``None``.

    Returns:
        An append-only file: the bytes of its complete lines past the acknowledged
        offset (from 0 when it was replaced, truncated or rewritten in place, by
        :func:`~evalsyncd.sync.lines.divergence`, the daemon's own check; a partial
        last line is not counted until its ``\\n`` comes). A replace-on-write file: its whole size.
    """
    if kind is not FileKind.APPEND:
        return st.st_size
    try:
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        start = 0
        if (
            entry is not None
            and entry.status is not EntryStatus.DELETED
            and divergence(fd, st, entry) is None
        ):
            start = entry.tail_offset
        return complete_end(fd, st.st_size, start) - start
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Backlog:
    """What a destination still has to upload: its dirty files compared with the journal.

    Attributes:
        files: files whose remote object is behind (or missing).
        bytes: bytes not yet acknowledged, by :func:`unacked_bytes` (append-only:
            complete lines past the acknowledged offset; replace-on-write: the
            whole size), as ``evalsyncd status`` counts them.
        oldest_s: age in seconds of the oldest unsynced change (by file mtime).
    """

    files: int
    bytes: int
    oldest_s: float
