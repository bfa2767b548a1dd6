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

Two views. With a tail log (``docs/design.md`` section 4), what evalsyncd's
readers see (main object + pending tail pieces, stitched) and what every other
tool reads (the *plain* object alone) differ for up to ``max_main_lag_s``.
The checks above are of the readers' view. Given ``plain`` (the same
destination opened with ``read_tail = False``), each plain object is checked
too (``view = "plain"``):

- equal to the expected content: OK;
- a line-complete prefix of it (``*.jsonl``) while the journal says the main
  object fell behind less than ``max_main_lag_s`` + :data:`DUE_GRACE_S` ago
  (or says nothing): OK, noted as *behind* (information, not a failure);
- an earlier whole version of a file replaced since: OK, noted, under the
  same time limit. "Earlier" is decided from the journal, never from the
  object's bytes: a replace-on-write file's plain object still has the version
  (ETag, generation) the journal recorded for it; a rewritten ``*.jsonl``
  (journal: nothing of the current file in the main object) has a plain
  object last modified at least :data:`_MTIME_SLACK_S` before the file's bytes
  went to the tail log (a tampering happens after that, so it is caught);
- anything else is a mismatch (exit 1): bytes the file never had, a plain
  object missing or behind past its due time, whatever the tail holds.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import crc32c

from evalsyncd.errors import InvalidKeyError, ObjectNotFoundError, StorageError
from evalsyncd.storage import Backend
from evalsyncd.sync.files import FileKind, classify, scan_tree
from evalsyncd.sync.journal import Entry
from evalsyncd.sync.lines import complete_end

__all__ = ["DUE_GRACE_S", "FileCheck", "VerifyReport", "expected_length", "verify_storage"]

_CHUNK = 8 * 1024 * 1024
_RECHECK_DELAY_S = 1.0
DUE_GRACE_S = 30.0
"""Time a plain object may stay behind past ``max_main_lag_s``, seconds (a pass, a retry)."""
_MTIME_SLACK_S = 2.0
"""How much earlier than the file's bytes went to the tail log an earlier version of a
rewritten ``*.jsonl`` must have been written, seconds (server clocks, S3's whole seconds)."""


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
        view: ``"readers"`` (main object + tail, as evalsyncd's readers see it)
            or ``"plain"`` (the object alone, as every other tool reads it).
        note: for an OK plain object that is not yet equal (behind within its
            due time, an earlier version), why that is fine; else ``""``.
        version: the object's version token, when known.
    """

    path: str
    ok: bool
    problem: str
    local_size: int
    remote_size: int | None
    method: str = ""
    detail: str = ""
    view: str = "readers"
    note: str = ""
    version: str | None = None


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
    notes: list[FileCheck] = field(default_factory=list)
    """Plain objects that are OK but not yet equal to their files (see the module docstring)."""

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
    return FileCheck(rel, True, "", length, remote.size, method, version=remote.version)


async def _same_prefix(storage: Backend, rel: str, local: Path, size: int) -> tuple[bool, str]:
    """Whether the object's ``size`` bytes equal the local file's first ``size`` bytes."""
    checksum = await storage.achecksum(rel)
    if checksum is not None and checksum[0] in ("crc32c", "sha256"):
        mine = await asyncio.to_thread(_local_digest, local, size, checksum[0])
        return mine == checksum[1], checksum[0]
    return await _compare_download(storage, rel, local, size), "download"


def _line_complete(local: Path, size: int) -> bool:
    """Whether the local file's byte ``size - 1`` is a newline (or ``size`` is 0)."""
    if size == 0:
        return True
    with open(local, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _due(behind_since: float, now: float, due_s: float) -> tuple[bool, str]:
    """``(late, explanation)`` for a main object behind since ``behind_since`` (Unix s)."""
    age = max(0.0, now - behind_since)
    late = age > due_s
    return late, (
        f"main object behind for {age:.0f} s, due within max_main_lag_s + "
        f"{DUE_GRACE_S:g} s = {due_s:g} s"
    )


async def _check_plain(
    plain: Backend,
    root: Path,
    rel: str,
    readers: FileCheck,
    row: Entry | None,
    due_s: float,
    now: float,
) -> FileCheck:
    """The plain object of ``rel`` against the local file; see the module docstring.

    ``readers`` is the OK check of the readers' view; ``row`` the file's journal row.
    """
    local = root / rel
    length = readers.local_size
    try:
        remote = await plain.astat(rel)
    except ObjectNotFoundError:
        remote = None
    out = FileCheck(rel, True, "", length, None, view="plain")
    if (
        remote is not None
        and readers.version is not None
        and (remote.size, remote.version) == (readers.remote_size, readers.version)
    ):  # the readers' check read this very object: nothing pending in the tail
        return replace(out, remote_size=remote.size, method=readers.method, version=remote.version)
    since = row.tail_since if row is not None else None
    late, why = _due(since, now, due_s) if since is not None else (False, "no journal row")
    if row is not None and since is None:
        # the journal says the main object holds row.acked_offset bytes and nothing is pending
        late, why = True, f"the journal says the daemon wrote {row.acked_offset} bytes there"
        if remote is not None and remote.size >= row.acked_offset:
            late, why = False, "the file changed since the daemon last saw it"
    if remote is None:
        if not late:
            return replace(out, note=f"not written yet, its bytes are in the tail log ({why})")
        return replace(out, ok=False, problem="missing", detail=f"no plain object ({why})")
    out = replace(out, remote_size=remote.size, version=remote.version)
    kind = classify(rel)
    same = False
    if remote.size <= length:
        same, method = await _same_prefix(plain, rel, local, remote.size)
        out = replace(out, method=method)
        if same and remote.size == length:
            return out
    if (
        same
        and kind is FileKind.APPEND
        and await asyncio.to_thread(_line_complete, local, remote.size)
    ):
        if late:
            detail = f"plain object holds {remote.size} of {length} bytes past its due time ({why})"
            return replace(out, ok=False, problem="behind", detail=detail)
        return replace(out, note=f"behind, holds {remote.size} of {length} bytes ({why})")
    earlier = False
    if row is not None and since is not None:
        if kind is FileKind.APPEND:
            # rewritten: the journal says the main object holds none of the current file,
            # and the plain object was last written well before the file's bytes went to
            # the tail (a write after that, however soon, is not the daemon's)
            earlier = (
                row.acked_offset == 0
                and row.remote_version is None
                and remote.mtime < since - _MTIME_SLACK_S
            )
        else:  # still the version the daemon last wrote there
            earlier = remote.version is not None and remote.version == row.remote_version
    if earlier:
        if late:
            detail = f"plain object still an earlier version past its due time ({why})"
            return replace(out, ok=False, problem="behind", detail=detail)
        return replace(out, note=f"an earlier version of a file replaced since ({why})")
    if remote.size > length:
        what = "longer than the local file"
    elif kind is not FileKind.APPEND:
        what = "neither the local file nor the version the daemon last wrote"
    elif same:
        what = "a prefix of the local file that ends inside a line"
    else:
        what = "not a prefix of the local file"
    return replace(
        out,
        ok=False,
        problem="size" if remote.size > length else "content",
        detail=f"plain object is {what}: bytes the file never had (whatever the tail log holds)",
    )


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
    plain: Backend | None = None,
    journal_rows: Mapping[str, Entry] | None = None,
    max_main_lag_s: float = 60.0,
    now: Callable[[], float] = time.time,
) -> VerifyReport:
    """Check every mirrored file under ``root`` against ``storage`` (opened by the caller).

    Args:
        storage: the destination's backend, entered.
        root: the watched root.
        name: the destination's name (for the report).
        exclude: directories to skip (the state directory).
        max_concurrency: files checked at once.
        on_check: called with each file's outcome (and each plain object's), as it comes.
        plain: the same destination with ``read_tail = False``, entered: its plain
            objects are checked too (see the module docstring). ``None``: only the
            readers' view (a backend without a tail log has no other).
        journal_rows: the destination's journal rows by path (when the plain
            objects fell behind, what the daemon last wrote); ``None``: unknown.
        max_main_lag_s: the destination's setting, seconds.
        now: wall clock, Unix seconds (injected for tests).

    Returns:
        The report; ``report.ok`` when every object equals its local file.
    """
    report = VerifyReport(destination=name, url=storage.url())
    files = await asyncio.to_thread(lambda: [rel for rel, _ in scan_tree(root, exclude)])
    sem = asyncio.Semaphore(max_concurrency)
    rows = journal_rows or {}
    due_s = max_main_lag_s + DUE_GRACE_S
    two_views = plain is not None and storage.supports_tail and storage.read_tail

    async def both(rel: str) -> FileCheck:
        """The readers' view; when it is fine and there is a plain view, the plain one."""
        check = await _check_once(storage, root, rel)
        if not two_views or plain is None or not check.ok:
            return check
        return await _check_plain(plain, root, rel, check, rows.get(rel), due_s, now())

    async def one(rel: str) -> FileCheck | None:
        async with sem:
            if rel.endswith(".json"):
                problem = await asyncio.to_thread(_invalid_json, root / rel)
                if problem is not None:
                    report.warnings.append(f"{rel}: not uploaded, does not parse ({problem})")
                    return None
            try:
                check = await both(rel)
                if not check.ok:  # a writer or the daemon may have been mid-way: look again
                    await asyncio.sleep(_RECHECK_DELAY_S)
                    check = await both(rel)
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
        elif check.note:
            report.notes.append(check)
    return report
