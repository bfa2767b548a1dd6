"""``MemoryStorage``: the storage contract in process memory, with scriptable faults.

For fast unit tests of code above the storage seam (the daemon's per-file and
tail paths, readers, ``verify``): no server, no network, and failures on
demand. It is a full :class:`~evalsyncd.storage.CloudStorage`: main objects,
the internal area and conditional creates, so the tail log
(:mod:`evalsyncd.storage.tail`) is written and stitched exactly as on S3 and
GCS. It does not replace the real servers of the backend tests.

Layout: a *bucket* is a named, process-wide :class:`MemoryBucket` (created on
first use; every ``MemoryStorage`` of that name, pickled copies included, sees
the same objects), holding ``key -> (bytes, generation, mtime)``::

    memory://{bucket}/{prefix}/{path}              a file's object
    memory://{bucket}/{prefix}/.evalsyncd/...      the internal area (tail log, catalog)

``append`` is atomic (the offset check and the write happen under the bucket's
lock), the version token is the object's generation (a counter of the bucket),
``achecksum`` gives the CRC32C of the object, as GCS does.

Faults (:class:`Faults`, ``storage.faults``, shared by the bucket) act on the
backend's *operations*, one per request a cloud backend would send:

==================  ======================================================
operation           what calls it
==================  ======================================================
``read``            ``read`` of a main object
``read_range``      ``read_range`` of a main object
``stat``            ``stat``, ``exists`` (the main object's metadata)
``list_dir``        ``list_dir`` (one level of main objects)
``write``           ``write``
``append``          ``append``
``remove``          ``remove``
``checksum``        ``achecksum``
``internal_get``    reads of the internal area (tail objects, the catalog)
``internal_put``    writes of the internal area (the catalog)
``internal_create`` conditional creates (a tail object per flush)
``list_keys``       listings of the internal area (the tail log)
``delete_keys``     deletes in the internal area (tail objects)
==================  ======================================================

::

    faults = storage.faults
    faults.fail("internal_create", times=2, error=TransientStorageError)
    faults.fail("append", lost_response=True)   # applied, then the answer is lost
    faults.delay("read", 0.05)                  # every read takes 50 ms longer
    faults.calls["append"]                      # how many appends were attempted
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar, get_args

import crc32c

from evalsyncd.errors import (
    ConflictError,
    ObjectNotFoundError,
    StorageError,
    TransientStorageError,
)
from evalsyncd.storage._base import StorageStat
from evalsyncd.storage._cloud import INTERNAL_DIR, CloudStorage

__all__ = [
    "OPERATIONS",
    "Fault",
    "Faults",
    "MemoryBucket",
    "MemoryStorage",
    "Operation",
    "drop_bucket",
    "memory_bucket",
]

T = TypeVar("T")

Operation = Literal[
    "read",
    "read_range",
    "stat",
    "list_dir",
    "write",
    "append",
    "remove",
    "checksum",
    "internal_get",
    "internal_put",
    "internal_create",
    "list_keys",
    "delete_keys",
]
"""The operations faults act on; see the module docstring."""

OPERATIONS: Final[frozenset[str]] = frozenset(get_args(Operation))


@dataclass
class Fault:
    """One scripted fault; see :meth:`Faults.fail` and :meth:`Faults.delay`.

    Attributes:
        op: the operation it acts on.
        times: calls it still applies to (``None``: every call).
        error: the class raised (``None``: a delay only).
        lost_response: the operation takes effect before ``error`` is raised.
        delay_s: seconds added before the operation runs.
    """

    op: Operation
    times: int | None
    error: type[StorageError] | None = None
    lost_response: bool = False
    delay_s: float = 0.0


@dataclass
class Faults:
    """The faults scripted on one bucket, and a count of every operation called.

    Thread-safe. Faults apply in the order they were added; each call of an
    operation takes one use of every fault on it that has uses left.

    Attributes:
        calls: operation -> number of calls so far (faulted ones included).
    """

    calls: Counter[str] = field(default_factory=Counter)
    _pending: list[Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(
        self,
        op: Operation,
        times: int = 1,
        error: type[StorageError] = TransientStorageError,
        *,
        lost_response: bool = False,
    ) -> Fault:
        """Make the next ``times`` calls of ``op`` raise ``error``.

        Args:
            op: the operation (see :data:`OPERATIONS`).
            times: how many calls fail (at least 1).
            error: a :class:`~evalsyncd.errors.StorageError` class; it is raised
                with a message naming the operation and the URL.
            lost_response: the operation takes effect first, then the error is
                raised: a write whose answer was lost on the way back.

        Returns:
            The fault (its ``times`` counts down to 0).

        Raises:
            ValueError: an unknown operation, ``times`` < 1, or an ``error`` that is not
                a ``StorageError`` class.
        """
        if times < 1:
            raise ValueError(f"times must be >= 1, not {times}")
        if not (isinstance(error, type) and issubclass(error, StorageError)):
            raise ValueError(f"error must be a StorageError class, not {error!r}")
        return self._add(Fault(_checked(op), times, error, lost_response))

    def delay(self, op: Operation, seconds: float, times: int | None = None) -> Fault:
        """Add ``seconds`` of latency to the next ``times`` calls of ``op`` (``None``: all).

        Raises:
            ValueError: an unknown operation, a negative delay or ``times`` < 1.
        """
        if seconds < 0:
            raise ValueError(f"negative delay {seconds}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, not {times}")
        return self._add(Fault(_checked(op), times, delay_s=float(seconds)))

    def clear(self) -> None:
        """Drop every scripted fault (the call counts stay)."""
        with self._lock:
            self._pending.clear()

    @property
    def pending(self) -> list[Fault]:
        """The faults with uses left, in the order they apply."""
        with self._lock:
            return list(self._pending)

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._pending.append(fault)
        return fault

    def _take(self, op: Operation) -> list[Fault]:
        """Count a call of ``op`` and take one use of each fault that applies to it."""
        with self._lock:
            self.calls[op] += 1
            taken = [f for f in self._pending if f.op == op]
            for f in taken:
                if f.times is not None:
                    f.times -= 1
            self._pending = [f for f in self._pending if f.times is None or f.times > 0]
        return taken


def _checked(op: str) -> Operation:
    if op not in OPERATIONS:
        raise ValueError(f"unknown operation {op!r}; one of {sorted(OPERATIONS)}")
    return op  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class _Object:
    data: bytes
    generation: int
    mtime: float


class MemoryBucket:
    """The objects of one named in-memory bucket and its :class:`Faults`. Thread-safe.

    Args:
        name: the bucket name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.faults = Faults()
        self.lock = threading.Lock()
        self.objects: dict[str, _Object] = {}
        self._generation = 0

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` (hold :attr:`lock`); returns the new generation."""
        self._generation += 1
        self.objects[key] = _Object(bytes(data), self._generation, time.time())
        return str(self._generation)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted (a snapshot)."""
        with self.lock:
            return sorted(k for k in self.objects if k.startswith(prefix))


_BUCKETS: dict[str, MemoryBucket] = {}
_BUCKETS_LOCK = threading.Lock()


def memory_bucket(name: str) -> MemoryBucket:
    """The process-wide bucket ``name``, created empty on first use."""
    with _BUCKETS_LOCK:
        bucket = _BUCKETS.get(name)
        if bucket is None:
            bucket = _BUCKETS[name] = MemoryBucket(name)
        return bucket


def drop_bucket(name: str) -> None:
    """Forget the bucket ``name`` and its objects (a test's cleanup); no error if unknown."""
    with _BUCKETS_LOCK:
        _BUCKETS.pop(name, None)


class MemoryStorage(CloudStorage):
    """Objects in a process-wide in-memory bucket under a prefix; see the module docstring.

    Implements ``Storage``, ``AsyncStorage`` and every capability of
    :class:`~evalsyncd.storage.Backend`. Instances hold configuration only and
    pickle; the bucket is found again by name.

    Args:
        bucket: bucket name (the bucket is created on first use).
        prefix: key prefix ("" for the bucket root).

    Raises:
        ValueError: an invalid bucket name.
    """

    scheme = "memory"

    @property
    def faults(self) -> Faults:
        """The bucket's faults and call counts (shared by every storage on the bucket)."""
        return memory_bucket(self.bucket).faults

    async def _open_client(self, stack: AsyncExitStack) -> MemoryBucket:
        return memory_bucket(self.bucket)

    async def _run(self, op: Operation, url: str, effect: Callable[[MemoryBucket], T]) -> T:
        """Run ``effect`` on the bucket under its lock, with the faults scripted on ``op``."""
        bucket: MemoryBucket = await self._client()
        faults = bucket.faults._take(op)
        delay_s = sum(f.delay_s for f in faults)
        if delay_s:
            await asyncio.sleep(delay_s)
        failing = next((f for f in faults if f.error is not None), None)
        if failing is not None and not failing.lost_response:
            raise _injected(failing, url)
        with bucket.lock:
            result = effect(bucket)
        if failing is not None:
            raise _injected(failing, url)
        return result

    # -- main objects --------------------------------------------------------------------

    async def _main_read(self, path: str) -> bytes:
        """See :meth:`Storage.read`."""
        key, url = self._key(path), self.url(path)
        return await self._run("read", url, lambda b: _get(b, key, url).data)

    async def _main_read_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        """See :meth:`Storage.read_range`."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"invalid range offset={offset} length={length}")
        key, url = self._key(path), self.url(path)
        end = None if length is None else offset + length
        return await self._run("read_range", url, lambda b: _get(b, key, url).data[offset:end])

    async def _main_stat(self, path: str) -> StorageStat | None:
        """See :meth:`Storage.stat`: the generation is the version."""
        key = self._key(path)

        def stat(b: MemoryBucket) -> StorageStat | None:
            obj = b.objects.get(key)
            if obj is None:
                return None
            return StorageStat(size=len(obj.data), mtime=obj.mtime, version=str(obj.generation))

        return await self._run("stat", self.url(path), stat)

    async def _main_list_dir(self, prefix: str) -> list[str]:
        """See :meth:`Storage.list_dir`; the ``.evalsyncd`` area at the top is hidden."""
        dir_key = self._dir_key(prefix)
        hidden = INTERNAL_DIR if dir_key == self._dir_key("") else None

        def names(b: MemoryBucket) -> list[str]:
            found = {k[len(dir_key) :].split("/", 1)[0] for k in b.objects if k.startswith(dir_key)}
            found.discard("")
            if hidden is not None:
                found.discard(hidden)
            return sorted(found)

        return await self._run("list_dir", self.url(prefix.strip("/")), names)

    async def awrite(self, path: str, data: bytes) -> str | None:
        """See :meth:`Storage.write`: returns the new generation."""
        key, payload = self._key(path), bytes(data)
        return await self._run("write", self.url(path), lambda b: b.put(key, payload))

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        """See :meth:`Storage.append`: the check and the write are one atomic step.

        Raises:
            ConflictError: ``offset`` does not match (``actual_size`` is the size found).
            ValueError: ``offset`` is negative.
        """
        if offset is not None and offset < 0:
            raise ValueError(f"negative offset {offset}")
        key, url, payload = self._key(path), self.url(path), bytes(data)

        def append(b: MemoryBucket) -> str:
            obj = b.objects.get(key)
            old = b"" if obj is None else obj.data
            if offset is not None and len(old) != offset:
                if obj is not None and len(old) == offset + len(payload) and old.endswith(payload):
                    return str(obj.generation)  # already applied: a retry
                raise ConflictError(
                    f"{url}: append at offset {offset} but the object holds {len(old)} bytes",
                    url=url,
                    actual_size=len(old),
                )
            if obj is not None and not payload:
                return str(obj.generation)
            return b.put(key, old + payload)

        return await self._run("append", url, append)

    async def aremove(self, path: str) -> None:
        """See :meth:`Storage.remove`: no error if missing."""
        key = self._key(path)
        await self._run("remove", self.url(path), lambda b: b.objects.pop(key, None))

    async def achecksum(self, path: str) -> tuple[str, str] | None:
        """See :meth:`Backend.achecksum`: the object's CRC32C (``None`` while the tail log
        holds bytes of the file that its object lacks, or when it is missing)."""
        if await self._tail_entry(path) is not None:
            return None
        key = self._key(path)

        def checksum(b: MemoryBucket) -> tuple[str, str] | None:
            obj = b.objects.get(key)
            if obj is None:
                return None
            return ("crc32c", base64.b64encode(crc32c.crc32c(obj.data).to_bytes(4, "big")).decode())

        return await self._run("checksum", self.url(path), checksum)

    # -- the internal area ------------------------------------------------------------------

    async def _list_keys(self, prefix: str, url: str, limit: int | None = None) -> list[str]:
        """Keys under ``prefix`` in key order (the first ``limit``)."""

        def keys(b: MemoryBucket) -> list[str]:
            found = sorted(k for k in b.objects if k.startswith(prefix))
            return found if limit is None else found[:limit]

        return await self._run("list_keys", url, keys)

    async def _delete_keys(self, keys: list[str], url: str) -> None:
        """Delete the objects (missing ones are fine)."""

        def delete(b: MemoryBucket) -> None:
            for key in keys:
                b.objects.pop(key, None)

        await self._run("delete_keys", url, delete)

    async def _internal_get(self, key: str, url: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of an object of the internal area."""
        return await self._run("internal_get", url, lambda b: _get(b, key, url).data[start:end])

    async def _internal_put(self, key: str, url: str, data: bytes, *, create: bool) -> None:
        """Store an object of the internal area; with ``create``, only if it is absent.

        Raises:
            ConflictError: ``create`` and the object exists.
        """
        payload = bytes(data)

        def put(b: MemoryBucket) -> None:
            if create and key in b.objects:
                raise ConflictError(f"{url}: the object exists", url=url)
            b.put(key, payload)

        await self._run("internal_create" if create else "internal_put", url, put)


def _get(bucket: MemoryBucket, key: str, url: str) -> _Object:
    obj = bucket.objects.get(key)
    if obj is None:
        raise ObjectNotFoundError(f"{url}: no such object", url=url)
    return obj


def _injected(fault: Fault, url: str) -> StorageError:
    assert fault.error is not None
    what = "after it took effect" if fault.lost_response else "before it ran"
    message = f"{url}: injected {fault.error.__name__} on {fault.op} ({what})"
    if issubclass(fault.error, ConflictError):
        return fault.error(message, url=url, actual_size=None)
    return fault.error(message, url=url)
