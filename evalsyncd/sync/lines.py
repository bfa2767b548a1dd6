"""Reading local files the way the daemon, ``status`` and ``verify`` must agree on.

- :func:`complete_end`: where the last complete line of an append-only file ends;
- :func:`read_lines`: the next delta of complete lines from an offset;
- :func:`fingerprint_at` and :func:`divergence`: whether a file is still the one a
  journal row describes (same inode, long enough, same CRC32C of the 4 KiB
  before the acknowledged offset);
- :func:`read_stable`: a whole replace-on-write file, or ``None`` if it changed
  while being read.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import crc32c

from evalsyncd.sync.files import open_beneath
from evalsyncd.sync.journal import Entry, EntryStatus

__all__ = [
    "FINGERPRINT_BYTES",
    "INLINE_READ_BYTES",
    "RemoteAhead",
    "RemoteDiverged",
    "blocking",
    "complete_end",
    "divergence",
    "fingerprint_at",
    "new_entry",
    "read_known",
    "read_lines",
    "read_stable",
    "same_file",
    "seen_as",
]

T = TypeVar("T")

FINGERPRINT_BYTES = 4096
_READ_BLOCK = 1024 * 1024


class RemoteDiverged(Exception):
    """The remote object cannot be reconciled with the file: rewrite it from offset 0."""


class RemoteAhead(Exception):
    """The remote object already holds more of this file (a write applied before a crash).

    Attributes:
        remote_size: bytes the remote holds, all of them equal to the file's.
        version: the remote object's version token.
    """

    def __init__(self, remote_size: int, version: str | None) -> None:
        super().__init__(remote_size)
        self.remote_size = remote_size
        self.version = version


def divergence(fd: int, st: os.stat_result, entry: Entry) -> str | None:
    """Why the file can no longer be appended to from ``entry.tail_offset``, or None."""
    if (st.st_dev, st.st_ino) != (entry.dev, entry.ino):
        return "replaced (new inode)"
    if st.st_size < entry.tail_offset:
        return "truncated"
    if entry.tail_offset > 0 and fingerprint_at(fd, entry.tail_offset) != entry.fingerprint:
        return "rewritten (fingerprint mismatch)"
    return None


def fingerprint_at(fd: int, end: int) -> int:
    """CRC32C of the (at most) 4 KiB of the file before ``end``."""
    start = max(0, end - FINGERPRINT_BYTES)
    return int(crc32c.crc32c(os.pread(fd, end - start, start)))


def complete_end(fd: int, size: int, offset: int = 0) -> int:
    """Offset just past the last ``\n`` in ``[offset, size)``, or ``offset`` if none.

    Reads backwards in 1 MiB blocks: cost is the length of the last partial line.
    """
    pos = size
    while pos > offset:
        lo = max(offset, pos - _READ_BLOCK)
        block = os.pread(fd, pos - lo, lo)
        nl = block.rfind(b"\n")
        if nl >= 0:
            return lo + nl + 1
        pos = lo
    return offset


def read_lines(fd: int, offset: int, size: int, chunk_bytes: int) -> bytes:
    """Bytes from ``offset`` up to the last newline within ``chunk_bytes`` (or up to the
    first newline after it, when one line is longer); ``b""`` when no complete line
    lies in ``[offset, size)``. Memory: about ``2 * chunk_bytes``, or the longest line
    plus one block when a line is longer (its end is found first, then it is read once)."""
    want = min(chunk_bytes, size - offset)
    if want <= 0:
        return b""
    data = os.pread(fd, want, offset)
    cut = data.rfind(b"\n")
    if cut >= 0:
        return data[: cut + 1]
    pos = offset + len(data)
    del data
    while pos < size:
        block = os.pread(fd, min(_READ_BLOCK, size - pos), pos)
        if not block:
            break
        nl = block.find(b"\n")
        if nl >= 0:
            line = os.pread(fd, pos + nl + 1 - offset, offset)
            # The file may have been truncated meanwhile: only a whole line counts.
            return line if line.endswith(b"\n") and len(line) == pos + nl + 1 - offset else b""
        pos += len(block)
    return b""


def read_stable(root: str | Path, path: str, st: os.stat_result) -> bytes | None:
    """The whole file ``path`` under ``root`` (opened with :func:`open_beneath`), or
    None if it is not the file ``st`` describes (another inode: not read) or changed
    (size, mtime or inode) while being read."""
    fd = open_beneath(root, path)
    try:
        if not same_file(os.fstat(fd), st.st_dev, st.st_ino):
            return None
        data = os.pread(fd, st.st_size + 1, 0)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
        return None
    if len(data) != st.st_size:
        return None
    return data


def read_known(root: str | Path, row: Entry) -> bytes | None:
    """The whole local file of ``row`` (opened with :func:`open_beneath`) if it is still
    the regular file the row describes (same device and inode), else None (gone,
    replaced, a symlink on its path, or a FIFO: never read).

    Raises:
        OSError: the file could not be read (other than gone).
    """
    try:
        fd = open_beneath(root, row.path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        if not same_file(st, row.dev, row.ino):
            return None
        return os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)


def same_file(st: os.stat_result, dev: int, ino: int) -> bool:
    """Whether ``st`` (an ``fstat``) is the regular file of device ``dev``, inode ``ino``."""
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino)


INLINE_READ_BYTES = 256 * 1024
"""Reads up to this size run on the event loop; larger ones in a worker thread."""


async def blocking(size: int, fn: Callable[..., T], *args: object) -> T:
    """Run a file read of about ``size`` bytes: inline when small (a thread hop costs
    more than the read), in a worker thread when large (the loop stays responsive)."""
    if size <= INLINE_READ_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def new_entry(
    destination: str,
    path: str,
    st: os.stat_result,
    *,
    acked_offset: int = 0,
    fingerprint: int | None = None,
    content_crc: int | None = None,
    remote_version: str | None = None,
    status: EntryStatus = EntryStatus.OK,
    tail_offset: int = -1,
    tail_since: float | None = None,
) -> Entry:
    """A journal row for ``path`` as seen in ``st``, acknowledged now."""
    return Entry(
        destination=destination,
        path=path,
        dev=st.st_dev,
        ino=st.st_ino,
        acked_offset=acked_offset,
        fingerprint=fingerprint,
        content_crc=content_crc,
        remote_version=remote_version,
        seen_size=st.st_size,
        seen_mtime_ns=st.st_mtime_ns,
        status=status,
        acked_at=time.time(),
        tail_offset=tail_offset,
        tail_since=tail_since,
    )


def seen_as(row: Entry, st: os.stat_result, **changes: Any) -> Entry:
    """``row`` with the identity and stat of ``st`` (and ``changes``); offsets unchanged."""
    return replace(
        row,
        dev=st.st_dev,
        ino=st.st_ino,
        seen_size=st.st_size,
        seen_mtime_ns=st.st_mtime_ns,
        **changes,
    )
