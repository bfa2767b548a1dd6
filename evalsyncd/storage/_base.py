"""The storage contract: ``Storage`` (sync) and ``AsyncStorage`` (async) protocols.

The method set and semantics follow ``tinker_cookbook.stores.storage`` (its
"cloud backend contract"); evalsyncd adds ``offset=`` to ``append``, which makes
retried appends idempotent, and ``aflush``.

Paths are relative POSIX strings (``"runs/r1/metadata.json"``), resolved against
the backend's root (a directory, or ``bucket/prefix``). Keys are used as they
are: UTF-8, never percent-encoded or normalised. An empty path, an absolute
path, or one with a ``.`` or ``..`` segment raises :class:`InvalidKeyError`
(a ``ValueError``) before any I/O.

Contract, per method (all backends):

- ``read(path) -> bytes``: the whole file. Missing: ``FileNotFoundError``
  (:class:`ObjectNotFoundError`).
- ``write(path, data) -> str | None``: replace the whole file atomically: a
  reader sees the old or the new bytes, never a mix. Creates parent
  "directories" as needed. Returns the new version token (``StorageStat.version``).
- ``append(path, data, *, offset=None) -> str | None``: add ``data`` at the end, creating the
  file if missing. With ``offset=N`` the append happens only if the file's
  current size is exactly ``N`` bytes; if the size is ``N + len(data)`` and the
  last ``len(data)`` bytes equal ``data``, the call is a no-op (the append was
  already applied: a retry); any other size raises :class:`ConflictError`.
  A backend never overwrites bytes it did not see. Cost on the wire: about
  ``len(data)`` on every backend (see each backend for how).
- ``exists(path) -> bool``; ``stat(path) -> StorageStat | None`` (``None`` if missing).
- ``read_range(path, offset, length=None) -> bytes``: ``length`` bytes (fewer at
  the end of the file, ``b""`` at or past the end). Missing: ``FileNotFoundError``.
- ``list_dir(prefix) -> list[str]``: sorted names (not full keys) of the
  immediate children of ``prefix``: files and "directories". ``[]`` if none.
- ``remove(path)``: delete; no error if missing. ``remove_dir(path)``: remove
  an empty directory; a no-op on object stores.
- ``flush()``: push anything the backend buffers (S3 segment compaction).
- Context manager: entering opens clients, exiting closes them.

Errors are the classes of :mod:`evalsyncd.errors`; transient and permanent
failures are distinct types, and an outage is never reported as "missing".
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Protocol, Self, runtime_checkable

from evalsyncd.errors import InvalidKeyError

__all__ = [
    "AsyncStorage",
    "Storage",
    "StorageStat",
    "SupportsChild",
    "check_key",
    "storage_join",
]


@dataclass(frozen=True, slots=True)
class StorageStat:
    """Metadata of one file or object.

    Attributes:
        size: length in bytes (for S3, the main object plus its pending segments).
        mtime: last modification, seconds since the Unix epoch (second granularity
            on some object stores).
        version: the backend's version token: S3 ETag (of the main object),
            GCS generation, or ``"{st_ino}:{st_mtime_ns}"`` locally. ``None`` when unknown.
    """

    size: int
    mtime: float
    version: str | None = None


def check_key(path: str) -> str:
    """Validate a relative storage path and return it unchanged.

    Args:
        path: a relative POSIX path such as ``"runs/r1/metadata.json"``.

    Returns:
        ``path`` itself (no normalisation is applied).

    Raises:
        InvalidKeyError: (a ``ValueError``) if ``path`` is empty, absolute, has an
            empty segment (``a//b``), a ``.`` or ``..`` segment (the message of a
            ``..`` says the key "escapes the storage root", as the reference storage
            tests expect), a NUL byte, or is not valid UTF-8 (a file name decoded
            with ``surrogateescape``).
    """
    if not isinstance(path, str) or not path:
        raise InvalidKeyError(f"invalid storage key {path!r}: empty")
    if path.startswith("/"):
        raise InvalidKeyError(f"invalid storage key {path!r}: absolute path")
    if "\x00" in path:
        raise InvalidKeyError(f"invalid storage key {path!r}: NUL byte")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"invalid storage key {path!r}: not valid UTF-8") from None
    for segment in path.rstrip("/").split("/"):
        if segment == "..":
            raise InvalidKeyError(
                f"invalid storage key {path!r}: escapes the storage root ('..' segment)"
            )
        if segment in ("", "."):
            raise InvalidKeyError(f"invalid storage key {path!r}: {segment or 'empty'!r} segment")
    return path


def storage_join(*parts: str) -> str:
    """Join path segments the way ``tinker_cookbook.stores.storage_join`` does.

    Strips leading and trailing slashes from each segment, drops empty ones,
    and collapses redundant separators and ``.``/``..`` with ``posixpath.normpath``.

    Returns:
        The joined relative path, or ``""`` for no (non-empty) parts.
    """
    stripped = [p.strip("/") for p in parts]
    joined = "/".join(p for p in stripped if p)
    if not joined:
        return ""
    return posixpath.normpath(joined)


@runtime_checkable
class Storage(Protocol):
    """Synchronous byte-level file I/O; see the module docstring for the contract."""

    def url(self, path: str = "") -> str:
        """A human-readable URI: ``file:///…``, ``s3://bucket/key``, ``gs://bucket/key``."""
        ...

    def read(self, path: str) -> bytes:
        """The whole file. Raises ``FileNotFoundError`` if missing."""
        ...

    def write(self, path: str, data: bytes) -> str | None:
        """Replace the file atomically with ``data``; return the new version token."""
        ...

    def append(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """Append ``data``; with ``offset``, only at that size (idempotent on retry).

        Returns:
            The version token the backend reported for the write (see
            :attr:`StorageStat.version`), or ``None`` when it has none.

        Raises:
            ConflictError: ``offset`` is given and the size is neither ``offset``
                nor ``offset + len(data)`` with ``data`` already at the end.
        """
        ...

    def exists(self, path: str) -> bool:
        """Whether the file exists."""
        ...

    def stat(self, path: str) -> StorageStat | None:
        """Size and mtime, or ``None`` if missing."""
        ...

    def read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` (to the end if ``length`` is None)."""
        ...

    def list_dir(self, prefix: str) -> list[str]:
        """Sorted names of the immediate children of ``prefix``."""
        ...

    def remove(self, path: str) -> None:
        """Delete the file; no error if missing."""
        ...

    def remove_dir(self, path: str) -> None:
        """Remove an empty directory; no error if missing or non-empty."""
        ...

    def flush(self) -> None:
        """Push buffered state to the backend (no-op where nothing is buffered)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class AsyncStorage(Protocol):
    """Asynchronous twin of :class:`Storage`; each method is documented there."""

    def url(self, path: str = "") -> str:
        """See :meth:`Storage.url`."""
        ...

    async def aread(self, path: str) -> bytes:
        """See :meth:`Storage.read`."""
        ...

    async def awrite(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`."""
        ...

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append`."""
        ...

    async def aexists(self, path: str) -> bool:
        """See :meth:`Storage.exists`."""
        ...

    async def astat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`."""
        ...

    async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`."""
        ...

    async def alist_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`."""
        ...

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`."""
        ...

    async def aremove_dir(self, path: str) -> None:
        """See :meth:`Storage.remove_dir`."""
        ...

    async def aflush(self) -> None:
        """See :meth:`Storage.flush`."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


@runtime_checkable
class SupportsChild(Protocol):
    """Capability: a storage that opens a sub-prefix as its own storage, sharing clients.

    Backends with a tail log have it (the log of a store lives under the store's
    own prefix), so an ``EvalStore`` at a sub-prefix reads through a child.
    """

    def child(self, path: str) -> Self:
        """The storage rooted at ``path`` under this one; see ``CloudStorage.child``."""
        ...
