"""The run catalog: every run's ``metadata.json`` in one object, so listing costs O(1) reads.

The daemon keeps one catalog per destination; readers (``EvalStore.list_runs``,
the fleet reader, ``evalsyncd runs ls``) use it when it is there and fall back
to one read per run when it is not. This module is neutral ground: it imports
only :mod:`evalsyncd.errors` and :mod:`evalsyncd.storage`, so the daemon (which
never imports :mod:`evalsyncd.store`) can write catalogs with it.

Location, relative to a store's prefix::

    {prefix}/
      .evalsyncd/
        catalog.json        # this format
      runs/
        {run_id}/metadata.json

Format (UTF-8 JSON, one object; version 1)::

    {
      "format": "evalsyncd-catalog",
      "version": 1,
      "runs": {
        "{run_id}": {
          "size": 412,                       # bytes of metadata.json
          "crc32c": "1a2b3c4d",              # CRC32C (Castagnoli) of those bytes, 8 hex digits
          "metadata": "{\\n  \\"run_id\\": ..."  # the metadata.json text, byte for byte
        },
        ...
      }
    }

A catalog the daemon knows complete also carries ``"tail": {"writer": W, "seq":
S}``: the tail log's writer (:mod:`evalsyncd.storage.tail`) and the newest tail
object's seq when the catalog was built, from a journal in which every
``runs/*/metadata.json`` was acknowledged with the content the catalog holds.

An entry whose ``metadata.json`` is not valid UTF-8 carries ``"metadata_b64"``
(standard base64) instead of ``"metadata"``. Unknown top-level keys and entry
keys are ignored (forward compatibility); a higher ``version`` is refused.

Consistency rules (what makes a reader's answer never wrong):

1. The catalog describes ``metadata.json`` objects *as mirrored*: the writer
   uploads a run's ``metadata.json`` first and the catalog after, in the same
   flush, so a catalog entry is never newer than the object it describes.
2. The listing of ``runs/`` is the truth about which runs exist (unless the
   tail log vouches for the catalog: rule 6). A reader lists ``runs/`` once; a run the catalog holds but the listing lacks was deleted
   and is never returned; a listed run missing from the catalog (created since
   the catalog was written) is read individually.
3. Each entry carries its size and CRC32C; an entry whose bytes do not match
   them is ignored and that run is read individually.
4. A catalog that is missing, does not parse, or has an unknown version is
   ignored with a warning naming its key: the reader falls back to one read
   per run. Only a storage failure other than "not found" is an error, and it
   propagates: an outage is never reported as "no runs".
5. Between the upload of a changed ``metadata.json`` and that of the catalog
   (one flush), a reader may see the previous metadata of that run; it never
   sees metadata that was never mirrored.

6. The catalog stands in for the listing of ``runs/`` (rule 2) only when the
   tail log vouches for it: the catalog has ``"tail"`` with writer W and seq S,
   the newest tail header of the same prefix is W's, and that header's mark
   :data:`CATALOG_MARK` (the seq of the newest tail object that changed a run's
   ``metadata.json``; see :attr:`evalsyncd.storage.tail.TailIndex.marks`) is at
   most S. The writer marks every such change: staged in the tail (the mark is
   in the same object), or made outside it (a large ``metadata.json`` written
   straight to its main object, a removal: a marked tail object is written
   first). So no run's ``metadata.json`` changed since the catalog was built,
   except through tail objects the reader's index still shows; the runs are the
   catalog's plus those whose ``metadata.json`` is pending in the tail, and a
   host listing costs the tail log's LIST and GET and the catalog's GET, no
   LIST of ``runs/``. Keys written under ``runs/`` behind the owner's back (the
   prefix has one writer, see docs/design.md) are not seen that way: a reader
   with ``use_catalog=False`` lists ``runs/``.

Bound: a reader reads at most :data:`MAX_CATALOG_BYTES` of a catalog (one
ranged read of that many bytes plus one); a larger catalog is
:class:`~evalsyncd.errors.CorruptObjectError` (naming its URL, the limit and
the bytes seen), which readers treat like a corrupt catalog (rule 4). JSON
nested too deeply is a :class:`CatalogError`.

Reading it through a storage: :func:`read_catalog_bytes` /
:func:`aread_catalog_bytes`. A cloud backend may reserve ``.evalsyncd/`` at
the top of its own prefix for the daemon (S3Storage refuses such keys). A
store at a storage's root reads the catalog through the storage's
:class:`~evalsyncd.storage.InternalArea` (``read_internal(name)``, a capability
of every evalsyncd backend; see :func:`~evalsyncd.storage._base.internal_area`); a
storage of another library has none and is asked for the plain key, and one
that refuses that key reads as "no catalog" (so its readers fall back to
per-run reads, still correct). A store opened one level up (a fleet's storage
with the host as store prefix) reads ``{host}/.evalsyncd/catalog.json`` as a
plain key.
"""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from evalsyncd.errors import CatalogError, CorruptObjectError, InvalidKeyError
from evalsyncd.storage._base import (
    AsyncStorage,
    Storage,
    async_internal_area,
    internal_area,
    storage_join,
)

__all__ = [
    "CATALOG_FORMAT",
    "CATALOG_MARK",
    "CATALOG_NAME",
    "CATALOG_PATH",
    "CATALOG_VERSION",
    "MAX_CATALOG_BYTES",
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "aread_catalog_bytes",
    "build_catalog",
    "catalog_from_root",
    "metadata_crc32c",
    "parse_catalog",
    "read_catalog_bytes",
    "write_catalog_bytes",
]

CATALOG_NAME = "catalog.json"
"""Name of the catalog in a storage's internal area (see :class:`~evalsyncd.storage.InternalArea`)."""

CATALOG_PATH = f".evalsyncd/{CATALOG_NAME}"
"""Key of the catalog relative to a store's prefix."""

CATALOG_FORMAT = "evalsyncd-catalog"
"""Value of the catalog's ``"format"`` key."""

CATALOG_VERSION = 1
"""The format version this module writes and the highest it reads."""

CATALOG_MARK = "catalog"
"""The tail log mark (:meth:`evalsyncd.storage.tail.TailWriter.mark`) of a tail object
that changes a run's ``metadata.json`` (rule 6)."""


MAX_CATALOG_BYTES = 64 * 1024 * 1024
"""Largest catalog a reader reads, bytes. A catalog holds every run's
``metadata.json`` (about 1 KiB each), so this is room for some 50,000 runs; a
larger one is refused and the runs are read one by one."""


def _takes_limit(method: Any) -> bool:
    """Whether an internal area's read takes ``limit=`` (every evalsyncd backend's does)."""
    try:
        return "limit" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _check_size(data: bytes, url: str) -> bytes:
    if len(data) > MAX_CATALOG_BYTES:
        raise CorruptObjectError(
            f"{url}: catalog larger than the limit of {MAX_CATALOG_BYTES} bytes "
            f"(read {len(data)} bytes and stopped)",
            url=url,
        )
    return data


def metadata_crc32c(data: bytes) -> str:
    """CRC32C (Castagnoli) of ``data`` as 8 lowercase hex digits."""
    return f"{_crc32c.crc32c(data):08x}"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One run's ``metadata.json`` as recorded in a catalog.

    Attributes:
        run_id: the run's directory name.
        data: the ``metadata.json`` bytes.
        size: recorded length in bytes.
        crc32c: recorded CRC32C, 8 hex digits.
    """

    run_id: str
    data: bytes
    size: int
    crc32c: str

    @property
    def intact(self) -> bool:
        """Whether ``data`` matches the recorded size and CRC32C."""
        return len(self.data) == self.size and metadata_crc32c(self.data) == self.crc32c


@dataclass(frozen=True)
class Catalog:
    """A parsed catalog: run id to entry.

    Attributes:
        version: the format version read.
        entries: run id to :class:`CatalogEntry` (intact or not; see
            :attr:`CatalogEntry.intact`).
        tail: ``(writer, seq)`` of the tail log the catalog was built against
            (``None``: not known complete; rule 6).
    """

    version: int
    entries: Mapping[str, CatalogEntry]
    tail: tuple[str, int] | None = None

    def vouched_by(self, writer: str, seq: int, marks: Mapping[str, int]) -> bool:
        """Whether a tail log whose newest header is ``writer``'s at ``seq`` with ``marks``
        vouches for this catalog: it may stand in for the listing of ``runs/`` (rule 6)."""
        if self.tail is None or not writer or seq < 0:
            return False
        by, built_at = self.tail
        return by == writer and marks.get(CATALOG_MARK, -1) <= built_at

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def get(self, run_id: str) -> CatalogEntry | None:
        """The entry of ``run_id``, or ``None``."""
        return self.entries.get(run_id)


def build_catalog(entries: Mapping[str, bytes], *, tail: tuple[str, int] | None = None) -> bytes:
    """Serialize a catalog.

    Args:
        entries: run id to the bytes of its ``metadata.json``, as mirrored.
        tail: ``(writer, seq)``: the catalog is complete as of that tail object
            (rule 6); ``None``: not known complete.

    Returns:
        The catalog object's bytes (UTF-8 JSON, run ids sorted, so equal input
        gives equal bytes and a writer can skip an unchanged upload).

    Raises:
        ValueError: a run id is empty or contains ``/``.
    """
    runs: dict[str, dict[str, Any]] = {}
    for run_id in sorted(entries):
        if not run_id or "/" in run_id:
            raise ValueError(f"invalid run id {run_id!r} in catalog")
        data = bytes(entries[run_id])
        entry: dict[str, Any] = {"size": len(data), "crc32c": metadata_crc32c(data)}
        try:
            entry["metadata"] = data.decode("utf-8")
        except UnicodeDecodeError:
            entry["metadata_b64"] = base64.b64encode(data).decode("ascii")
        runs[run_id] = entry
    doc: dict[str, Any] = {"format": CATALOG_FORMAT, "version": CATALOG_VERSION}
    if tail is not None:
        doc["tail"] = {"writer": tail[0], "seq": tail[1]}
    doc["runs"] = runs
    return json.dumps(doc, indent=None, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_catalog(data: bytes, url: str) -> Catalog:
    """Parse catalog bytes.

    Args:
        data: the catalog object's bytes.
        url: where they came from (named in errors).

    Returns:
        The catalog. Entries whose bytes do not match their size or CRC32C are
        kept but not :attr:`~CatalogEntry.intact`.

    Raises:
        CatalogError: not JSON, not a catalog, an unsupported version, or a
            malformed entry (the message names ``url`` and the entry).
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CatalogError(f"{url}: corrupt catalog: {exc}", url=url) from exc
    except RecursionError:
        raise CatalogError(f"{url}: corrupt catalog: JSON nested too deeply", url=url) from None
    if not isinstance(doc, dict) or doc.get("format") != CATALOG_FORMAT:
        raise CatalogError(f"{url}: not an evalsyncd catalog (no format key)", url=url)
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CatalogError(f"{url}: corrupt catalog: bad version {version!r}", url=url)
    if version > CATALOG_VERSION:
        raise CatalogError(
            f"{url}: catalog version {version} is newer than this reader's ({CATALOG_VERSION})",
            url=url,
        )
    runs = doc.get("runs")
    if not isinstance(runs, dict):
        raise CatalogError(f"{url}: corrupt catalog: 'runs' is not an object", url=url)
    entries: dict[str, CatalogEntry] = {}
    for run_id, raw in runs.items():
        if not run_id or "/" in run_id:
            raise CatalogError(f"{url}: corrupt catalog: invalid run id {run_id!r}", url=url)
        entries[run_id] = _parse_entry(run_id, raw, url)
    return Catalog(version=version, entries=entries, tail=_parse_tail(doc.get("tail")))


def _parse_tail(raw: Any) -> tuple[str, int] | None:
    """The ``"tail"`` key: ``(writer, seq)``, or ``None`` when absent or malformed (then the
    catalog is only not vouched for: rule 6)."""
    if not isinstance(raw, dict):
        return None
    writer, seq = raw.get("writer"), raw.get("seq")
    if not isinstance(writer, str) or not writer or len(writer) > 256:
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None
    return writer, seq


def _parse_entry(run_id: str, raw: Any, url: str) -> CatalogEntry:
    def bad(why: str) -> CatalogError:
        return CatalogError(f"{url}: corrupt catalog entry {run_id!r}: {why}", url=url)

    if not isinstance(raw, dict):
        raise bad("not an object")
    size, crc = raw.get("size"), raw.get("crc32c")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad(f"bad size {size!r}")
    if not isinstance(crc, str) or len(crc) != 8:
        raise bad(f"bad crc32c {crc!r}")
    if isinstance(raw.get("metadata"), str):
        data = raw["metadata"].encode("utf-8")
    elif isinstance(raw.get("metadata_b64"), str):
        try:
            data = base64.b64decode(raw["metadata_b64"], validate=True)
        except ValueError as exc:
            raise bad(f"bad metadata_b64 ({exc})") from exc
    else:
        raise bad("no metadata")
    return CatalogEntry(run_id=run_id, data=data, size=size, crc32c=crc.lower())


def read_catalog_bytes(storage: Storage, prefix: str = "") -> bytes | None:
    """The catalog object of the store at ``prefix`` in ``storage``, or ``None`` if there is none.

    One ranged read of at most :data:`MAX_CATALOG_BYTES` + 1 bytes.

    Raises:
        CorruptObjectError: the catalog is larger than :data:`MAX_CATALOG_BYTES`.
        StorageError: the storage failed (anything but "not found").
    """
    area = None if prefix else internal_area(storage)
    path = storage_join(prefix, CATALOG_PATH)
    try:
        if area is not None:
            if _takes_limit(area.read_internal):
                data = bytes(area.read_internal(CATALOG_NAME, limit=MAX_CATALOG_BYTES + 1))
            else:  # another library's area: read whole, then checked
                data = bytes(area.read_internal(CATALOG_NAME))
        else:
            data = storage.read_range(path, 0, MAX_CATALOG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except InvalidKeyError:
        return None  # the storage reserves .evalsyncd/ and has no internal area
    return _check_size(data, storage.url(path))


async def aread_catalog_bytes(storage: AsyncStorage, prefix: str = "") -> bytes | None:
    """Async :func:`read_catalog_bytes`.

    Raises:
        CorruptObjectError: the catalog is larger than :data:`MAX_CATALOG_BYTES`.
        StorageError: the storage failed (anything but "not found").
    """
    area = None if prefix else async_internal_area(storage)
    path = storage_join(prefix, CATALOG_PATH)
    try:
        if area is not None:
            if _takes_limit(area.aread_internal):
                data = bytes(await area.aread_internal(CATALOG_NAME, limit=MAX_CATALOG_BYTES + 1))
            else:  # another library's area: read whole, then checked
                data = bytes(await area.aread_internal(CATALOG_NAME))
        else:
            data = await storage.aread_range(path, 0, MAX_CATALOG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except InvalidKeyError:
        return None
    return _check_size(data, storage.url(path))


def write_catalog_bytes(storage: Storage, data: bytes, prefix: str = "") -> None:
    """Replace the catalog object of the store at ``prefix`` in ``storage`` with ``data``.

    Uses the storage's internal area (see :func:`~evalsyncd.storage._base.internal_area`)
    when ``prefix`` is empty.

    Raises:
        StorageError: the storage failed.
    """
    area = None if prefix else internal_area(storage)
    if area is not None:
        area.write_internal(CATALOG_NAME, data)
    else:
        storage.write(storage_join(prefix, CATALOG_PATH), data)


def catalog_from_root(root: Path) -> bytes:
    """Build the catalog of a local EvalStore root (what the daemon uploads).

    Includes every ``runs/*/metadata.json`` that is a regular file (not a
    symlink) and parses as a JSON object; others are left out, so readers
    read those runs individually.

    Args:
        root: the local store directory (holding ``runs/``).

    Returns:
        The catalog bytes (see :func:`build_catalog`); an empty catalog when
        ``root/runs`` does not exist.

    Raises:
        OSError: the directory could not be read.
    """
    entries: dict[str, bytes] = {}
    runs = root / "runs"
    try:
        children = sorted(runs.iterdir())
    except FileNotFoundError:
        children = []
    for child in children:
        path = child / "metadata.json"
        try:
            if child.is_symlink() or path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue  # deleted meanwhile
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue  # not a run's metadata (RecursionError: nested too deeply)
        if isinstance(doc, dict):
            entries[child.name] = data
    return build_catalog(entries)
