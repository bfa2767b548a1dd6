"""``evalsyncd verify``: does each destination hold every local file, byte for byte?

For every file the daemon mirrors (see :mod:`evalsyncd.sync.files`), the
*expected* content is the whole file, or for a ``*.jsonl`` its longest prefix
ending in ``\\n``. Each remote object is checked against it:

1. its size (``stat``): missing, shorter ("behind") or longer is a mismatch;
2. its content, by the checksum the store keeps for that object when there is
   one (the backend's ``achecksum(path)`` capability, see
   :class:`~evalsyncd.storage.Backend`; today GCS ``crc32c``),
   computed locally over the expected bytes. ETags
   are never used: a multipart or composite object's ETag is not an MD5 of its
   content. When the store keeps no usable checksum the object is downloaded
   in ranged chunks and compared with the local bytes.

A remote object shorter than the expected content is checked too: if it is an
exact prefix of the local file it is reported as ``behind`` (the daemon has
not caught up), otherwise as ``content``. Files that change while being
checked are checked a second time before a mismatch is reported. ``*.json``
files that do not parse are not uploaded by design; they are listed as
warnings, not mismatches. A file whose path the destination refuses as a key
(:class:`~evalsyncd.errors.InvalidKeyError`) is not checked: it is listed in
:attr:`VerifyReport.skipped`, by path and reason.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

from evalsyncd.errors import InvalidKeyError, ObjectNotFoundError, StorageError
from evalsyncd.storage import Backend
from evalsyncd.sync.files import FileKind, classify, scan_tree
from evalsyncd.sync.lines import complete_end

__all__ = ["FileCheck", "VerifyReport", "expected_length", "verify_storage"]

_CHUNK = 8 * 1024 * 1024
_RECHECK_DELAY_S = 1.0


@dataclass(frozen=True)
class FileCheck:
    """The outcome for one file.

    Attributes:
        path: relative POSIX path.
        ok: the remote object equals the expected content.
        problem: ``""`` when ok; else ``missing``, ``behind``, ``size``,
            ``content`` or ``error``.
        local_size: expected length in bytes.
        remote_size: the object's size, ``None`` when missing or unknown.
        method: how the content was compared: ``crc32c``, ``sha256``,
            ``download`` (or ``""`` when the size already differed).
        detail: a human-readable explanation.
    """

    path: str
    ok: bool
    problem: str
    local_size: int
    remote_size: int | None
    method: str = ""
    detail: str = ""


@dataclass
class VerifyReport:
    """All checks of one destination.

    Attributes:
        skipped: ``"{path}: {reason}"`` per file not checked because its path is
            not a valid key of the destination.
    """

    destination: str
    url: str
    checked: int = 0
    mismatches: list[FileCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    methods: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No mismatch."""
        return not self.mismatches


def expected_length(path: Path, rel: str, size: int) -> int:
    """How many leading bytes of the local file the remote object must hold."""
    if classify(rel) is not FileKind.APPEND or size == 0:
        return size
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        return complete_end(fd, size)
    finally:
        os.close(fd)


def _local_digest(path: Path, length: int, algorithm: str) -> str:
    """Base64 of the big-endian CRC32C, or of the SHA-256, of ``path[0:length]``."""
    sha = hashlib.sha256() if algorithm == "sha256" else None
    crc = 0
    with open(path, "rb") as f:
        left = length
        while left > 0:
            block = f.read(min(_CHUNK, left))
            if not block:
                raise OSError(f"{path} shrank while being read")
            left -= len(block)
            if sha is not None:
                sha.update(block)
            else:
                crc = crc32c.crc32c(block, crc)
    raw = sha.digest() if sha is not None else crc.to_bytes(4, "big")
    return base64.b64encode(raw).decode()


async def _compare_download(storage: Backend, rel: str, local: Path, length: int) -> bool:
    """Stream the object in ranged chunks and compare with ``local[0:length]``."""
    fd = await asyncio.to_thread(os.open, local, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < length:
            n = min(_CHUNK, length - offset)
            remote = await storage.aread_range(rel, offset, n)
            mine = await asyncio.to_thread(os.pread, fd, n, offset)
            if remote != mine:
                return False
            offset += n
    finally:
        os.close(fd)
    return True


async def _check_once(storage: Backend, root: Path, rel: str) -> FileCheck:
    local = root / rel
    st = await asyncio.to_thread(os.stat, local)
    length = await asyncio.to_thread(expected_length, local, rel, st.st_size)
    try:
        remote = await storage.astat(rel)
    except ObjectNotFoundError:
        remote = None
    if remote is None:
        return FileCheck(rel, False, "missing", length, None, detail="no remote object")
    if remote.size > length:
        return FileCheck(
            rel, False, "size", length, remote.size, detail="remote is longer than the local file"
        )
    checksum = await storage.achecksum(rel)
    if checksum is not None and checksum[0] in ("crc32c", "sha256"):
        algorithm, value = checksum
        mine = await asyncio.to_thread(_local_digest, local, remote.size, algorithm)
        same, method = mine == value, algorithm
    else:
        same = await _compare_download(storage, rel, local, remote.size)
        method = "download"
    if remote.size < length:
        if same:
            return FileCheck(
                rel,
                False,
                "behind",
                length,
                remote.size,
                method,
                f"remote holds the first {remote.size} of {length} bytes",
            )
        return FileCheck(
            rel, False, "content", length, remote.size, method, "remote is not a prefix of the file"
        )
    if not same:
        return FileCheck(rel, False, "content", length, remote.size, method, "content differs")
    return FileCheck(rel, True, "", length, remote.size, method)


def _invalid_json(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        if data.strip():
            json.loads(data)
    except ValueError as exc:
        return str(exc)
    except OSError:
        return None
    return None


async def verify_storage(
    storage: Backend,
    root: Path,
    *,
    name: str,
    exclude: tuple[Path, ...] = (),
    max_concurrency: int = 8,
    on_check: Callable[[FileCheck], None] | None = None,
) -> VerifyReport:
    """Check every mirrored file under ``root`` against ``storage`` (opened by the caller).

    Args:
        storage: the destination's backend, entered.
        root: the watched root.
        name: the destination's name (for the report).
        exclude: directories to skip (the state directory).
        max_concurrency: files checked at once.
        on_check: called with each file's outcome, as it comes.

    Returns:
        The report; ``report.ok`` when every object equals its local file.
    """
    report = VerifyReport(destination=name, url=storage.url())
    files = await asyncio.to_thread(lambda: [rel for rel, _ in scan_tree(root, exclude)])
    sem = asyncio.Semaphore(max_concurrency)

    async def one(rel: str) -> FileCheck | None:
        async with sem:
            if rel.endswith(".json"):
                problem = await asyncio.to_thread(_invalid_json, root / rel)
                if problem is not None:
                    report.warnings.append(f"{rel}: not uploaded, does not parse ({problem})")
                    return None
            try:
                check = await _check_once(storage, root, rel)
                if not check.ok:  # a writer or the daemon may have been mid-way: look again
                    await asyncio.sleep(_RECHECK_DELAY_S)
                    check = await _check_once(storage, root, rel)
            except ObjectNotFoundError as exc:  # removed remotely while checking
                check = FileCheck(rel, False, "missing", 0, None, detail=str(exc))
            except FileNotFoundError:
                return None  # deleted locally while checking
            except InvalidKeyError as exc:
                report.skipped.append(f"{rel}: {exc}")
                return None
            except (StorageError, OSError) as exc:
                check = FileCheck(
                    rel, False, "error", 0, None, detail=f"{type(exc).__name__}: {exc}"
                )
        if on_check is not None:
            on_check(check)
        return check

    for check in await asyncio.gather(*(one(rel) for rel in sorted(files))):
        if check is None:
            continue
        report.checked += 1
        if check.method:
            report.methods[check.method] = report.methods.get(check.method, 0) + 1
        if not check.ok:
            report.mismatches.append(check)
    return report
