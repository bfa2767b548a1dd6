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
- ``flush()``: push anything the backend buffers (none of evalsyncd's own backends buffers
  any more: a no-op; kept for the ``tinker_cookbook`` method set).
- Context manager: entering opens clients, exiting closes them.

Errors are the classes of :mod:`evalsyncd.errors`; transient and permanent
failures are distinct types, and an outage is never reported as "missing".

``Storage`` and ``AsyncStorage`` are all a reader needs (a storage of another
library with that method set works with ``EvalStore``). What differs between
evalsyncd's own backends is declared, never probed: :class:`Backend` is the
contract plus these capabilities, and every backend implements all of it:

=============================  ===========================================================
capability                     meaning (local / S3 / GCS / memory)
=============================  ===========================================================
``supports_tail``              keeps a tail log, ``tail_writer`` works (no / yes / yes / yes)
``append_in_place_min_bytes``  the object size from which ``append`` sends only the new
                               bytes (0 / 5 MiB / 0 / 0)
``async_native``               the ``a*`` methods are native, not threads (no / yes / yes / yes)
``local_root``                 the directory holding the files (the root / ``None`` / ...)
``achecksum(path)``            the checksum the store keeps for a whole file, or ``None``
                               (``None`` / ``None`` / ``crc32c`` / ``crc32c``)
``read_internal(name)`` ...    the daemon's own objects, :class:`InternalArea` (and async)
``acreate_internal(name, b)``  create one of them only if absent (the prefix's owner claim)
=============================  ===========================================================
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from evalsyncd.storage._keys import check_key

if TYPE_CHECKING:
    from evalsyncd.storage.tail import TailWriter

__all__ = [
    "AsyncInternalArea",
    "AsyncStorage",
    "Backend",
    "InternalArea",
    "Storage",
    "StorageStat",
    "SupportsChild",
    "async_internal_area",
    "check_key",
    "internal_area",
    "storage_join",
]


@dataclass(frozen=True, slots=True)
class StorageStat:
    """Metadata of one file or object.

    Attributes:
        size: length in bytes.
        mtime: last modification, seconds since the Unix epoch (second granularity
            on some object stores).
        version: the backend's version token: S3 ETag (of the main object),
            GCS generation, or ``"{st_ino}:{st_mtime_ns}"`` locally. ``None`` when unknown.
    """

    size: int
    mtime: float
    version: str | None = None


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


@runtime_checkable
class InternalArea(Protocol):
    """Capability: the daemon's own objects (the run catalog) at ``.evalsyncd/{name}``.

    The area is under the storage's root, hidden from ``list_dir``. S3 reserves
    it at its root (plain keys under ``.evalsyncd/`` are refused there), so these
    methods are the way in. Every evalsyncd backend has them, and their async
    twins (:class:`AsyncInternalArea`); a storage of another library may not:
    see :func:`internal_area`.
    """

    def read_internal(self, name: str, *, limit: int | None = None) -> bytes:
        """The bytes of ``.evalsyncd/{name}`` (with ``limit``: at most its first
        ``limit`` bytes, one ranged read, so a reader bounds what it downloads).

        Raises:
            ObjectNotFoundError: (a ``FileNotFoundError``) the object is missing.
            InvalidKeyError: ``name`` is not a valid key.
        """
        ...

    def write_internal(self, name: str, data: bytes) -> None:
        """Replace ``.evalsyncd/{name}`` with ``data`` (one request on object stores)."""
        ...


@runtime_checkable
class AsyncInternalArea(Protocol):
    """Asynchronous twin of :class:`InternalArea`."""

    async def aread_internal(self, name: str, *, limit: int | None = None) -> bytes:
        """See :meth:`InternalArea.read_internal`."""
        ...

    async def awrite_internal(self, name: str, data: bytes) -> None:
        """See :meth:`InternalArea.write_internal`."""
        ...


def internal_area(storage: object) -> InternalArea | None:
    """The internal area of ``storage``, or ``None`` for a storage that has none.

    Every evalsyncd backend has one (see :class:`Backend`); a storage of another
    library with only the ``Storage`` method set has none, and callers then use
    plain keys (``.evalsyncd/catalog.json``). This and :func:`async_internal_area`
    are the one place that tells the two apart, so code above this package
    never probes a storage.
    """
    return storage if isinstance(storage, InternalArea) else None


def async_internal_area(storage: object) -> AsyncInternalArea | None:
    """The async internal area of ``storage``, or ``None``; see :func:`internal_area`.

    Looks only at the ``a*`` methods, so an async-only storage is never asked
    for a sync attribute.
    """
    return storage if isinstance(storage, AsyncInternalArea) else None


@runtime_checkable
class Backend(Storage, AsyncStorage, InternalArea, AsyncInternalArea, Protocol):
    """An evalsyncd backend: both contracts plus the capabilities of the module docstring.

    ``LocalStorage``, ``S3Storage``, ``GCSStorage`` and ``MemoryStorage`` implement
    every member; code above :mod:`evalsyncd.storage` (the daemon, ``verify``)
    types against this protocol and reads the capabilities, never the class.
    """

    read_tail: bool
    """Whether reads stitch pending tail pieces (the daemon turns it off on its own
    instances: it reconciles against main objects). Always ``False`` without a tail."""

    @property
    def supports_tail(self) -> bool:
        """Whether this backend keeps a tail log (:mod:`evalsyncd.storage.tail`)."""
        ...

    @property
    def append_in_place_min_bytes(self) -> int:
        """The object size, in bytes, from which ``append`` sends only the new bytes."""
        ...

    @property
    def async_native(self) -> bool:
        """Whether the ``a*`` methods are native (``False``: the sync ones in a thread)."""
        ...

    @property
    def local_root(self) -> Path | None:
        """The local directory holding the files, or ``None`` for a remote store."""
        ...

    def tail_writer(self, writer: str) -> TailWriter:
        """A writer of the tail log under this storage's root.

        Raises:
            NotImplementedError: the backend keeps no tail log (``supports_tail``).
        """
        ...

    async def acreate_internal(self, name: str, data: bytes) -> None:
        """Create ``.evalsyncd/{name}`` with ``data`` only if it does not exist (one request).

        S3 ``PutObject`` with ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, a
        local directory a hard link of a complete temporary file (``link(2)``
        fails on an existing name, so a reader never sees a partial object).
        A server that ignores the precondition overwrites instead: callers that
        rely on it read the object back (see :mod:`evalsyncd.sync.owner`).

        Raises:
            ConflictError: the object exists.
            InvalidKeyError: ``name`` is not a valid key.
        """
        ...

    async def achecksum(self, path: str) -> tuple[str, str] | None:
        """The checksum the store keeps for the whole file, or ``None`` if it keeps none.

        Returns:
            ``(algorithm, value)``: ``("crc32c", base64 of the big-endian CRC32C)``
            or ``("sha256", base64 digest)``; ``None`` when the file is missing,
            the store keeps no usable checksum (S3 ETags are not content hashes,
            a local file has none), or pending tail bytes make the stored one stale.
            Cost: at most one metadata request.
        """
        ...

    def close(self) -> None:
        """Close clients opened for the sync methods (a no-op where there are none)."""
        ...

    async def aclose(self) -> None:
        """Close the client of the running event loop (a no-op where there is none)."""
        ...
