"""Retention: evict mirrored runs from the local disk, only once every byte is proven safe.

::

    scan_runs(root)            runs/{run_id}/: finalized? newest mtime, files, bytes
        |
    choose(runs, policy, usage)           PURE: eligibility, oldest first, age or
        |                                 high/low water marks (table tests)
    journal_blocker(run, rows, held)      PURE: every destination's row of every file:
        |                                 status ok, unchanged, main object exact, nothing
        |                                 pending (dirty or in the tail log)
    prove(run, mirrors)                   one request per file per destination: the CRC32C
        |                                 the store keeps (GCS: a metadata read), else one
        |                                 download compared with the local bytes (S3, local)
    evict(run, proof)          no await from here on (the daemon's loop cannot interleave):
                               re-check stat, rows and held sets; journal intent with the
                               run's rows taken out (one transaction); marker
                               runs/{run_id}/.evicted.json; unlink the files; journal evicted

A destination that is not healthy (backoff, parked) stops every eviction of the
round. What stays on disk: ``runs.jsonl``, every run's ``metadata.json`` and
``summary.json`` (what the store needs to list runs, and the run catalog), the
marker, and anything that is not a run's mirrored file. The daemon ignores the
files of an evicted run (:func:`evicted_runs`); ``evalsyncd restore`` brings
them back and removes the marker.

Crash safety (``kill -9`` anywhere): before the intent commits, nothing is
changed. After it, :func:`recover` (at the daemon's start and before every
round) finishes each intent: when no file of the run was deleted yet, it is
rolled back (rows put back, marker removed: the run is whole and is proven
again later); otherwise the remaining files that still equal what was proven
(size and CRC32C, read locally) are deleted and the run recorded as evicted. So
a run is always whole, or recorded as evicted with its marker in place (reads
then go to the mirror, which was proven to hold every file).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import shutil
import stat as stat_mod
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import structlog

from evalsyncd.config import RetentionSettings
from evalsyncd.errors import StorageError
from evalsyncd.evicted import MARKER_NAME, EvictionMarker, build_marker, parse_marker
from evalsyncd.storage import Backend
from evalsyncd.sync.files import FileKind, classify, open_dir_beneath
from evalsyncd.sync.journal import Entry, EntryStatus, Journal

__all__ = [
    "KEPT_NAMES",
    "Choice",
    "DiskUsage",
    "LocalFile",
    "Mirror",
    "Policy",
    "Retention",
    "RoundReport",
    "RunOnDisk",
    "RunReport",
    "RunView",
    "choose",
    "disk_usage",
    "eligibility",
    "evicted_runs",
    "journal_blocker",
    "prove",
    "quiet_for",
    "recover",
    "scan_runs",
]

log = structlog.get_logger("evalsyncd.retention")

KEPT_NAMES = ("metadata.json", "summary.json")
"""Files of ``runs/{run_id}/`` that eviction never deletes."""

_CHUNK = 8 * 1024 * 1024


# -- the pure policy -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """The retention settings :func:`choose` follows (see :class:`RetentionSettings`)."""

    min_age_s: float = 3600.0
    abandoned_after_s: float | None = None
    max_age_s: float | None = None
    high_water: float | None = None
    low_water: float | None = None

    @classmethod
    def of(cls, s: RetentionSettings) -> Policy:
        """The policy of a ``[retention]`` settings block."""
        return cls(s.min_age_s, s.abandoned_after_s, s.max_age_s, s.high_water, s.low_water)


@dataclass(frozen=True, slots=True)
class RunView:
    """What the policy knows of one run.

    Attributes:
        run_id: the run.
        finalized: its ``summary.json`` is present, or ``metadata.json`` scores every benchmark.
        quiet_s: seconds since its newest change (negative: dated in the future,
            e.g. the clock was stepped back; never quiet).
        bytes: bytes eviction would free.
    """

    run_id: str
    finalized: bool
    quiet_s: float
    bytes: int


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """The root's filesystem: ``total`` and ``used`` bytes."""

    total: int
    used: int

    @property
    def share(self) -> float:
        """Used share, 0-1."""
        return self.used / self.total if self.total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Choice:
    """A run the policy picked: its id, why (``max_age_s``, ``high_water``,
    ``min_age_s`` when no trigger is set) and the bytes it frees."""

    run_id: str
    reason: str
    bytes: int


def quiet_for(newest_mtime: float, now: float) -> float:
    """Seconds a run has been quiet (negative when its newest change is in the future)."""
    return now - newest_mtime


def eligibility(run: RunView, policy: Policy) -> str | None:
    """Why ``run`` may be evicted (``"finalized"``, ``"abandoned"``), or ``None``.

    A finalized run must be quiet for ``min_age_s``; an open run
    for ``abandoned_after_s`` (never when unset). A run dated in the future is never quiet.
    """
    if run.quiet_s < 0:
        return None
    if run.finalized:
        return "finalized" if run.quiet_s >= policy.min_age_s else None
    limit = policy.abandoned_after_s
    if limit is not None and run.quiet_s >= max(limit, policy.min_age_s):
        return "abandoned"
    return None


def choose(runs: Iterable[RunView], policy: Policy, usage: DiskUsage | None) -> list[Choice]:
    """The runs to evict now, oldest (longest quiet) first.

    - ``max_age_s``: every eligible run quiet that long.
    - ``high_water``/``low_water`` (with ``usage``): when the used share is at or above
      ``high_water``, eligible runs oldest first until the share would fall to
      ``low_water`` or below.
    - neither set: every eligible run (``min_age_s`` is the age).

    Args:
        runs: the runs not yet evicted.
        policy: the settings.
        usage: the filesystem's usage (``None``: unknown, no space trigger).
    """
    eligible = sorted(
        (r for r in runs if eligibility(r, policy) is not None),
        key=lambda r: (-r.quiet_s, r.run_id),
    )
    picked: dict[str, Choice] = {}
    if policy.max_age_s is None and policy.high_water is None:
        return [Choice(r.run_id, "min_age_s", r.bytes) for r in eligible]
    if policy.max_age_s is not None:
        for r in eligible:
            if r.quiet_s >= policy.max_age_s:
                picked[r.run_id] = Choice(r.run_id, "max_age_s", r.bytes)
    high, low = policy.high_water, policy.low_water
    if high is not None and low is not None and usage is not None and usage.share >= high:
        used = usage.used - sum(c.bytes for c in picked.values())
        target = low * usage.total
        for r in eligible:
            if used <= target:
                break
            if r.run_id not in picked:
                picked[r.run_id] = Choice(r.run_id, "high_water", r.bytes)
                used -= r.bytes
    order = {r.run_id: i for i, r in enumerate(eligible)}
    return sorted(picked.values(), key=lambda c: order[c.run_id])


# -- the runs on disk --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    """One mirrored file of a run that eviction would delete (root-relative POSIX path)."""

    path: str
    st: os.stat_result

    @property
    def size(self) -> int:
        """Its size, bytes."""
        return self.st.st_size


@dataclass(frozen=True)
class RunOnDisk:
    """A run directory as :func:`scan_runs` saw it.

    Attributes:
        run_id: the directory's name.
        finalized: ``summary.json`` is present, or ``metadata.json`` scores every benchmark.
        newest_mtime: newest mtime of anything in it (files, directories, ignored
            files; the run directory's own only when it is empty), Unix seconds.
        files: the mirrored files eviction would delete.
        kept_bytes: bytes of what stays (``metadata.json``, ``summary.json``, the marker).
        marker: its eviction marker, ``None`` when not evicted.
        others: files eviction leaves alone (temporary files, dot-files, others'),
            relative paths; a run with any is never evicted (a writer may be at work).
    """

    run_id: str
    finalized: bool
    newest_mtime: float
    files: tuple[LocalFile, ...]
    kept_bytes: int
    marker: EvictionMarker | None
    others: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        """Bytes eviction would free."""
        return sum(f.size for f in self.files)

    def view(self, now: float) -> RunView:
        """The policy's view of this run at ``now`` (Unix seconds)."""
        return RunView(self.run_id, self.finalized, quiet_for(self.newest_mtime, now), self.bytes)


def _scan_run(root: Path, run_id: str) -> RunOnDisk:
    base = root / "runs" / run_id
    files: list[LocalFile] = []
    others: list[str] = []
    kept = 0
    # not the run directory's own mtime: writing and removing the eviction marker changes
    # it, and a rolled-back eviction must not make a run look freshly written
    newest = 0.0
    marker: EvictionMarker | None = None
    stack = [(base, f"runs/{run_id}/")]
    while stack:
        directory, rel_dir = stack.pop()
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(directory):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                rel = rel_dir + entry.name
                newest = max(newest, st.st_mtime)
                if stat_mod.S_ISDIR(st.st_mode):
                    stack.append((Path(entry.path), rel + "/"))
                elif rel_dir.count("/") == 2 and entry.name == MARKER_NAME:
                    kept += st.st_size
                    with contextlib.suppress(OSError, ValueError):
                        marker = parse_marker(Path(entry.path).read_bytes(), entry.path)
                elif rel_dir.count("/") == 2 and entry.name in KEPT_NAMES:
                    kept += st.st_size
                elif rel_dir.count("/") == 2 and entry.name.startswith(_MARKER_TMP):
                    continue  # a marker write cut short by a crash; recover() removes it
                elif stat_mod.S_ISREG(st.st_mode) and classify(rel) is not FileKind.IGNORED:
                    files.append(LocalFile(rel, st))
                else:
                    others.append(rel)
    if not newest:  # nothing in it
        newest = base.lstat().st_mtime
    finalized = (base / "summary.json").is_file() or _scored(base / "metadata.json")
    files.sort(key=lambda f: f.path)
    return RunOnDisk(run_id, finalized, newest, tuple(files), kept, marker, tuple(sorted(others)))


def _scored(path: Path) -> bool:
    """Whether ``metadata.json`` has a score for each of its benchmarks (at least one):
    what ``EvalStore.finalize_run`` leaves, for a run that never wrote ``summary.json``."""
    # the store's rules for its JSON, imported here: a daemon's start does not load the store
    from evalsyncd.store.layout import MAX_JSON_BYTES, loads_bounded

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        meta = loads_bounded(raw) if len(raw) <= MAX_JSON_BYTES else None
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    benchmarks, scores = meta.get("benchmarks"), meta.get("scores")
    return (
        isinstance(benchmarks, list)
        and bool(benchmarks)
        and isinstance(scores, dict)
        and all(isinstance(b, str) and b in scores for b in benchmarks)
    )


def scan_runs(root: Path) -> list[RunOnDisk]:
    """Every run directory under ``root/runs`` (sorted by id); unreadable ones are skipped."""
    out = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        names = sorted(e.name for e in os.scandir(root / "runs") if e.is_dir(follow_symlinks=False))
        for name in names:
            if name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, PermissionError):
                out.append(_scan_run(root, name))
    return out


def evicted_runs(root: Path) -> set[str]:
    """Ids of the runs under ``root`` that carry an eviction marker (one stat per run)."""
    out = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for e in os.scandir(root / "runs"):
            if os.path.exists(os.path.join(e.path, MARKER_NAME)):
                out.add(e.name)
    return out


# -- proving a run safe ------------------------------------------------------------------


@dataclass(frozen=True)
class Mirror:
    """A destination as retention sees it.

    Attributes:
        name: the destination's name (its journal rows).
        storage: its opened backend.
        state: ``"healthy"``, ``"backoff"`` or ``"parked"``; anything but healthy
            stops every eviction.
        held: the paths the destination still has work on (dirty, or in its tail
            log); called again right before the deletion.
    """

    name: str
    storage: Backend
    state: str = "healthy"
    held: Callable[[], Collection[str]] = field(default=frozenset)


def journal_blocker(
    run: RunOnDisk, rows: dict[str, dict[str, Entry]], held: dict[str, Collection[str]]
) -> str | None:
    """Why the journal says ``run`` is not yet safe at every destination, or ``None``.

    Every file needs, at each destination (``rows``: destination -> path -> row): a row
    with status ``ok``, describing the file as it is now (inode, size, mtime), its main
    object exact (no tail backlog, ``acked_offset`` = size), and the path not ``held``.

    Args:
        run: the run.
        rows: each destination's journal rows, by path.
        held: each destination's paths with pending work.
    """
    if run.others:
        return f"{run.others[0]} is not a mirrored file (a writer may be at work)"
    for name, by_path in rows.items():
        busy = held.get(name, ())
        for f in run.files:
            row = by_path.get(f.path)
            if row is None:
                return f"{name}: {f.path} not uploaded yet"
            if f.path in busy:
                return f"{name}: {f.path} has pending work"
            if row.status is not EntryStatus.OK:
                return f"{name}: {f.path} is {row.status.value}"
            if not row.unchanged(f.st):
                return f"{name}: {f.path} changed since its last upload"
            if row.main_behind or row.acked_offset != f.size:
                return f"{name}: {f.path} main object holds {row.acked_offset} of {f.size} bytes"
    return None


def _local_read(path: Path, st: os.stat_result) -> tuple[bytes | None, int]:
    """The file's bytes (``None`` above one chunk) and its CRC32C, checked unchanged.

    Raises:
        OSError: unreadable, or changed while read (``FileNotFoundError``).
    """
    crc, kept = 0, bytearray()
    with open(path, "rb") as f:
        now = os.fstat(f.fileno())
        if (now.st_ino, now.st_size, now.st_mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            raise FileNotFoundError(f"{path} changed")
        while block := f.read(_CHUNK):
            crc = crc32c.crc32c(block, crc)
            if st.st_size <= _CHUNK:
                kept += block
    return (bytes(kept) if st.st_size <= _CHUNK else None), crc


async def _remote_equal(
    storage: Backend, f: LocalFile, full: Path, data: bytes | None, crc: int
) -> bool:
    """Whether the destination's plain object of ``f`` equals the local bytes, in one
    request on the way to "yes":

    - the store keeps a CRC32C (GCS): that of the whole object, one metadata read;
    - a local mirror: the whole file, read and compared (no network);
    - else (S3): one ranged GET of the file's size, compared byte for byte (a file
      above 8 MiB: one per 8 MiB). S3 keeps no whole-object checksum for objects
      built by appends; bytes the remote holds past the local size are not
      seen (the journal says the daemon wrote exactly the local size).
    """
    checksum = await storage.achecksum(f.path)
    if checksum is not None:
        algorithm, value = checksum
        if algorithm == "crc32c":
            return value == base64.b64encode(crc.to_bytes(4, "big")).decode()
    if data is not None:
        try:
            if storage.local_root is not None:
                return await storage.aread(f.path) == data
            return await storage.aread_range(f.path, 0, len(data)) == data
        except FileNotFoundError:
            return False
    offset = 0
    fd = await asyncio.to_thread(os.open, full, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while offset < f.size:
            n = min(_CHUNK, f.size - offset)
            try:
                remote = await storage.aread_range(f.path, offset, n)
            except FileNotFoundError:
                return False
            if remote != await asyncio.to_thread(os.pread, fd, n, offset):
                return False
            offset += n
    finally:
        os.close(fd)
    return True


async def prove(
    root: Path, run: RunOnDisk, mirrors: Sequence[Mirror]
) -> tuple[list[tuple[str, int, int]] | None, str | None]:
    """Check that every destination holds every file of ``run`` as a plain object equal
    to the local bytes (the journal was checked before, :func:`journal_blocker`).

    Returns:
        ``(files, None)``: ``(path, size, CRC32C)`` of each file, proven; or
        ``(None, why)``: the first destination and file not proven.

    Raises:
        StorageError: a destination failed a check (failing or unreachable); the
            caller stops every eviction of the round.
    """
    proven: list[tuple[str, int, int]] = []
    for f in run.files:
        full = root / f.path
        try:
            data, crc = await asyncio.to_thread(_local_read, full, f.st)
        except OSError as exc:
            return None, f"{f.path}: {exc}"
        for m in mirrors:
            try:
                same = await _remote_equal(m.storage, f, full, data, crc)
            except OSError as exc:
                return None, f"{m.name}: {f.path}: {type(exc).__name__}: {exc}"
            except StorageError as exc:  # failing or unreachable: stops every eviction
                raise _Unreachable(f"destination {m.name} failed a check: {exc}") from exc
            if not same:
                return None, f"{m.name}: {f.path} differs from the local file"
        proven.append((f.path, f.size, crc))
    return proven, None


class _Unreachable(StorageError):
    """A destination failed a check: no eviction in this round."""


# -- evicting, journaled -----------------------------------------------------------------


_MARKER_TMP = ".evicted."
"""Prefix of the temporary file a marker is written to (then renamed)."""


def _write_marker(root: Path, marker: EvictionMarker) -> None:
    path = root / "runs" / marker.run_id / MARKER_NAME
    tmp = path.with_name(f"{_MARKER_TMP}{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(build_marker(marker))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _delete_files(root: Path, run_id: str, files: Iterable[str]) -> None:
    """Unlink ``files`` and then the empty directories they leave (never the run's own).
    Each file is unlinked from its directory opened beneath the root
    (:func:`~evalsyncd.sync.files.open_dir_beneath`): a run directory swapped for a
    symlink after the proof never gets files outside the root unlinked (those files
    stay; nothing is lost)."""
    dirs: set[Path] = set()
    for rel in files:
        parent, _, name = rel.rpartition("/")
        try:
            fd = open_dir_beneath(root, parent)
        except OSError:
            log.warning("evict_file_skipped", key=rel, reason="not beneath the root any more")
            continue
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)
        dirs.add((root / rel).parent)
    base = root / "runs" / run_id
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        while d != base and d.is_relative_to(base):
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent
    _fsync_dir(base)


def _matches(root: Path, rel: str, size: int, crc: int) -> bool:
    """Whether the local file still holds what was proven (size and CRC32C)."""
    try:
        st = os.stat(root / rel, follow_symlinks=False)
        if st.st_size != size:
            return False
        _, now = _local_read(root / rel, st)
    except OSError:
        return False
    return now == crc


def recover(root: Path, journal: Journal, mirrors: Sequence[str] = ()) -> list[str]:
    """Finish every eviction a crash interrupted (see the module docstring).

    Args:
        root: the watched root.
        journal: the journal.
        mirrors: destination URLs, for a marker that must be rewritten.

    Returns:
        The ids of the runs whose intent was finished or rolled back.
    """
    done = []
    evictions = journal.evictions()
    for run_id in evictions:
        # a marker write cut short: only ever after the run's eviction row (the intent),
        # so only those runs' directories are read, not every run's at each start
        for tmp in (root / "runs" / run_id).glob(f"{_MARKER_TMP}*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    for run_id, ev in evictions.items():
        if ev.state != "intent":
            continue
        gone = [p for p, _, _ in ev.files if not (root / p).exists()]
        if not gone:
            journal.rollback_eviction(run_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root / "runs" / run_id / MARKER_NAME)
            log.warning("eviction_rolled_back", run_id=run_id, reason="no file was deleted yet")
        else:
            marker_path = root / "runs" / run_id / MARKER_NAME
            if not marker_path.exists():
                _write_marker(root, _marker_of(run_id, ev.files, ev.started_at, mirrors))
            left = [p for p, n, c in ev.files if p not in gone and _matches(root, p, n, c)]
            changed = [p for p, _, _ in ev.files if p not in gone and p not in left]
            _delete_files(root, run_id, left)
            journal.finish_eviction(run_id, time.time())
            if changed:
                log.error(
                    "evicted_run_file_changed",
                    run_id=run_id,
                    files=changed,
                    action="kept on disk; restore the run to write to it",
                )
            log.info(
                "run_evicted", run_id=run_id, files=len(ev.files), bytes=ev.bytes, recovered=True
            )
        done.append(run_id)
    return done


def _marker_of(
    run_id: str, files: Iterable[tuple[str, int, int]], now: float, mirrors: Sequence[str]
) -> EvictionMarker:
    files = list(files)
    return EvictionMarker(
        run_id=run_id,
        evicted_at=now,
        mirrors=tuple(mirrors),
        files=tuple(p for p, _, _ in files),
        bytes=sum(n for _, n, _ in files),
    )


# -- a round ------------------------------------------------------------------------------


@dataclass
class RunReport:
    """One run in a round's report: what the policy and the checks said."""

    run_id: str
    bytes: int
    finalized: bool
    quiet_s: float
    choice: str | None = None
    """Why it was picked (``None``: not picked)."""
    blocker: str | None = None
    """Why a picked or eligible run is kept (which destination is not yet safe)."""
    evicted: bool = False
    """Evicted in this round."""


@dataclass
class RoundReport:
    """What one retention round saw and did (``evalsyncd status``, ``evict --dry-run``).

    Attributes:
        local_bytes: bytes of run files on disk (kept files included).
        evictable_bytes: bytes of eligible runs whose journal rows say they are safe.
        evicted_bytes: bytes of every run recorded as evicted (journal).
        evicted_runs: how many runs are recorded as evicted.
        usage: the filesystem's usage (``None`` if unknown).
        runs: the runs picked or eligible, oldest first.
        oldest_kept: the oldest finalized run not evicted and why it is kept.
        stopped: why the round deleted nothing (a destination not healthy), or ``None``.
    """

    local_bytes: int = 0
    evictable_bytes: int = 0
    evicted_bytes: int = 0
    evicted_runs: int = 0
    usage: DiskUsage | None = None
    runs: list[RunReport] = field(default_factory=list)
    oldest_kept: RunReport | None = None
    stopped: str | None = None


def disk_usage(root: Path) -> DiskUsage:
    """The usage of ``root``'s filesystem (``shutil.disk_usage``)."""
    u = shutil.disk_usage(root)
    return DiskUsage(u.total, u.used)


class Retention:
    """Retention rounds over one root: choose, prove, evict, all journaled.

    Args:
        root: the watched root.
        settings: the ``[retention]`` settings.
        journal: the daemon's journal.
        mirrors: returns the destinations as they are now.
        usage: the filesystem's usage (injected for tests; default ``shutil.disk_usage``).
        clock: wall clock, Unix seconds (injected for tests).
    """

    def __init__(
        self,
        root: Path,
        settings: RetentionSettings,
        journal: Journal,
        mirrors: Callable[[], Sequence[Mirror]],
        *,
        usage: Callable[[Path], DiskUsage] = disk_usage,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.policy = Policy.of(settings)
        self.journal = journal
        self.mirrors = mirrors
        self.usage = usage
        self.clock = clock
        self.last: RoundReport | None = None
        """The report of the last round."""

    def urls(self) -> list[str]:
        """The destinations' URLs (written into eviction markers)."""
        return [m.storage.url() for m in self.mirrors()]

    def assess(self) -> tuple[RoundReport, list[tuple[RunOnDisk, Choice]]]:
        """The policy and the journal's view, no request: a report and the runs picked
        whose journal rows say they are safe, oldest first."""
        now = self.clock()
        runs = scan_runs(self.root)
        evictions = self.journal.evictions()
        report = RoundReport()
        with contextlib.suppress(OSError):
            report.usage = self.usage(self.root)
        report.evicted_runs = sum(1 for e in evictions.values() if e.state == "evicted")
        report.evicted_bytes = sum(e.bytes for e in evictions.values() if e.state == "evicted")
        mirrors = self.mirrors()
        rows = {m.name: self.journal.entries(m.name) for m in mirrors}
        held = {m.name: m.held() for m in mirrors}
        # a run with nothing to free (no data file) is left alone
        live = [r for r in runs if r.marker is None and r.run_id not in evictions and r.files]
        report.local_bytes = sum(r.bytes + r.kept_bytes for r in runs)
        by_id = {r.run_id: r for r in live}
        chosen = {
            c.run_id: c for c in choose((r.view(now) for r in live), self.policy, report.usage)
        }
        picked: list[tuple[RunOnDisk, Choice]] = []
        for r in sorted(live, key=lambda r: (r.newest_mtime, r.run_id)):
            v = r.view(now)
            why = eligibility(v, self.policy)
            if why is None and not r.finalized:
                continue  # an open run: not a candidate, not reported
            entry = RunReport(r.run_id, r.bytes, r.finalized, v.quiet_s)
            report.runs.append(entry)
            if why is None:
                entry.blocker = (
                    f"quiet {max(0.0, v.quiet_s):.0f} s, min_age_s is {self.policy.min_age_s:.0f} s"
                )
                continue
            entry.blocker = journal_blocker(r, rows, held)
            if entry.blocker is None:
                report.evictable_bytes += r.bytes
            if r.run_id not in chosen:
                entry.blocker = entry.blocker or "not needed: below the marks and max_age_s"
                continue
            entry.choice = chosen[r.run_id].reason
            if entry.blocker is None:
                picked.append((by_id[r.run_id], chosen[r.run_id]))
        order = list(chosen)
        picked.sort(key=lambda p: order.index(p[0].run_id))
        unhealthy = [m for m in mirrors if m.state != "healthy"]
        if not mirrors:
            report.stopped = "no destination configured"
        elif unhealthy:
            report.stopped = f"destination {unhealthy[0].name} is {unhealthy[0].state}"
        self._oldest_kept(report)
        return report, picked

    async def round(self, *, dry_run: bool = False) -> RoundReport:
        """One round: recover interrupted evictions, choose, prove, evict (unless ``dry_run``).

        Storage errors never escape: a destination that fails a check keeps the run
        (its report says why).
        """
        if not dry_run:
            recover(self.root, self.journal, self.urls())
            self._forget_restored()
        report, picked = self.assess()
        self.last = report
        if report.stopped is not None:
            return report
        entries = {e.run_id: e for e in report.runs}
        for run, choice in picked:
            entry = entries[run.run_id]
            mirrors = list(self.mirrors())
            unhealthy = [m for m in mirrors if m.state != "healthy"]
            if unhealthy:
                report.stopped = f"destination {unhealthy[0].name} is {unhealthy[0].state}"
                break
            try:
                proof, why = await prove(self.root, run, mirrors)
            except StorageError as exc:
                entry.blocker = report.stopped = str(exc)
                break
            if proof is None:
                entry.blocker = why
                continue
            if dry_run:
                continue
            entry.evicted = self._evict(run, proof, choice, mirrors)
            if not entry.evicted:
                entry.blocker = "changed while being checked"
        self._oldest_kept(report)
        return report

    @staticmethod
    def _oldest_kept(report: RoundReport) -> None:
        """Point ``report.oldest_kept`` at the oldest finalized run still on disk, with why."""
        report.oldest_kept = None
        for entry in report.runs:
            if entry.finalized and not entry.evicted:
                why = (
                    entry.blocker
                    or report.stopped
                    or (
                        "safe by the journal: evicted by the next round once every "
                        "destination's objects are checked"
                    )
                )
                report.oldest_kept = dataclasses.replace(entry, blocker=why)
                return

    def _evict(
        self,
        run: RunOnDisk,
        proof: list[tuple[str, int, int]],
        choice: Choice,
        mirrors: Sequence[Mirror],
    ) -> bool:
        """Delete the proven files of ``run``, journaled. Runs without awaiting, so nothing
        else on the daemon's loop interleaves between the last check and the deletion."""
        fresh = _scan_run(self.root, run.run_id)
        if [(f.path, f.st.st_ino, f.size, f.st.st_mtime_ns) for f in fresh.files] != [
            (f.path, f.st.st_ino, f.size, f.st.st_mtime_ns) for f in run.files
        ] or fresh.marker is not None:
            return False
        rows = {m.name: self.journal.entries(m.name) for m in mirrors}
        if journal_blocker(fresh, rows, {m.name: m.held() for m in mirrors}) is not None:
            return False
        now = self.clock()
        self.journal.begin_eviction(run.run_id, proof, choice.reason, now)
        _write_marker(self.root, _marker_of(run.run_id, proof, now, self.urls()))
        _delete_files(self.root, run.run_id, [p for p, _, _ in proof])
        self.journal.finish_eviction(run.run_id, self.clock())
        log.info(
            "run_evicted",
            run_id=run.run_id,
            reason=choice.reason,
            files=len(proof),
            bytes=sum(n for _, n, _ in proof),
            destinations=[m.name for m in mirrors],
        )
        return True

    def _forget_restored(self) -> None:
        """Drop the eviction rows of runs that ``evalsyncd restore`` brought back."""
        for run_id, ev in self.journal.evictions().items():
            if ev.state == "evicted" and not (self.root / "runs" / run_id / MARKER_NAME).exists():
                self.journal.forget_eviction(run_id)
                log.info("evicted_run_restored", run_id=run_id)
