"""``evalsyncd status``: each destination's state and backlog, without the daemon's help.

It opens the journal read-only (safe while the daemon runs: SQLite WAL readers
never block the writer), refusing with :class:`~evalsyncd.sync.journal.JournalError`
a journal the daemon would refuse (damaged, another root, an unknown schema
version) rather than reporting it healthy, and scans the watched root, then compares each file
with the journal row of each destination, the way the daemon's rescan does:

- a file whose identity and stat match the row is in sync (a ``*.jsonl`` may
  still end in a partial line, which is not pending until its ``\\n`` comes);
- otherwise an append-only file is behind by its complete lines past the
  acknowledged offset (from 0 if it was replaced or truncated), and a
  replace-on-write file by its whole size.

The state, last success and last error come from the journal's
``destinations`` table, as the daemon last recorded them. The age of the
oldest unsynced change is an estimate from file times: for a file mirrored
before, the time since the daemon last saw it in sync (its recorded mtime);
for a file never mirrored, the time since it was last modified.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evalsyncd.config import Settings
from evalsyncd.sync.files import (
    FileKind,
    classify,
    display_path,
    key_problem,
    scan_tree,
)
from evalsyncd.sync.journal import Entry, Journal
from evalsyncd.sync.offline import JOURNAL_NAME, root_replaced, unacked_bytes
from evalsyncd.sync.owner import read_owner_records

__all__ = [
    "DestinationStatus",
    "StatusReport",
    "collect_status",
    "format_bytes",
    "format_status",
    "retention_status",
]


@dataclass(frozen=True)
class DestinationStatus:
    """One destination, as ``evalsyncd status`` reports it.

    Attributes:
        name: the destination's name.
        url: its URL.
        state: ``healthy``, ``backoff`` or ``parked`` as last recorded by the
            daemon; ``unknown`` if the daemon never ran it.
        pending_files: files whose remote object is behind.
        pending_bytes: bytes not yet acknowledged.
        oldest_unsynced_s: estimated age of the oldest unsynced change,
            seconds; ``None`` when nothing is pending.
        invalid_files: ``*.json`` files reported unparseable and not uploaded.
        last_success: Unix time of the last successful upload pass, or ``None``.
        last_error: the last error message, or ``None``.
        last_error_at: Unix time of ``last_error``, or ``None``.
        owner_host: the hostname in the prefix's owner claim as the daemon last
            read it (``None``: not read yet, or no claim but another writer's tail).
        owner_is_this_host: whether that claim is this state directory's
            (``None``: not read yet).
        owner_claimed_at: when the owner claimed the prefix, Unix seconds.
        owner_checked_at: when the daemon last read the claim, Unix seconds.
    """

    name: str
    url: str
    state: str
    pending_files: int
    pending_bytes: int
    oldest_unsynced_s: float | None
    invalid_files: int
    last_success: float | None
    last_error: str | None
    last_error_at: float | None
    owner_host: str | None = None
    owner_is_this_host: bool | None = None
    owner_claimed_at: float | None = None
    owner_checked_at: float | None = None


@dataclass(frozen=True)
class StatusReport:
    """The whole report: the root, the journal and every configured destination."""

    root: str
    journal: str
    journal_exists: bool
    files: int
    destinations: list[DestinationStatus]
    retention: dict[str, Any] | None = None
    """Retention (``[retention]``, see :func:`retention_status`); ``None`` when off."""
    not_mirrorable: dict[str, str] = field(default_factory=dict)
    """Files no destination can hold (their path is not a valid key), printable path ->
    why; they are not counted as pending (see :func:`~evalsyncd.sync.files.key_problem`)."""
    root_replaced: bool = False
    """The root is another directory (device, inode) than the one the journal mirrored:
    the daemon leaves files missing from it as they were at the destinations (an
    unmounted volume's mount point; ``--adopt-root`` records a moved root)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times as Unix seconds)."""
        return asdict(self)

    @property
    def parked(self) -> list[str]:
        """The destinations the daemon last recorded as ``parked`` (a permanent error, such
        as access denied or another daemon's prefix: a person must act), by name."""
        return [d.name for d in self.destinations if d.state == "parked"]


def _pending(
    root: Path, rel: str, st: os.stat_result, entry: Entry | None
) -> tuple[int, int, float | None, bool]:
    """``(files, bytes, changed_since, invalid)`` of one file at one destination."""
    if entry is not None and entry.unchanged(st):
        return 0, 0, None, entry.status == "invalid"
    same_file = (
        entry is not None
        and entry.status != "deleted"
        and (entry.dev, entry.ino) == (st.st_dev, st.st_ino)
    )
    since = entry.seen_mtime_ns / 1e9 if same_file and entry is not None else st.st_mtime
    kind = classify(rel)
    n_bytes = unacked_bytes(root / rel, kind, st, entry)
    if kind is FileKind.APPEND and n_bytes == 0 and (entry is not None or st.st_size > 0):
        return 0, 0, None, False  # at most a partial line: nothing to send yet
    return 1, n_bytes, since, False


def collect_status(settings: Settings, *, now: float | None = None) -> StatusReport:
    """Scan the root and read the journal (read-only); see the module docstring.

    Raises:
        JournalError: the journal exists but cannot be read, or is one the daemon
            would refuse (damaged, another root, an unknown schema version).
    """
    now = time.time() if now is None else now
    journal_path = settings.state_dir / JOURNAL_NAME
    files = list(scan_tree(settings.root, (settings.state_dir,)))
    bad = {rel: why for rel, _ in files if (why := key_problem(rel)) is not None}
    files = [(rel, st) for rel, st in files if rel not in bad]
    exists = journal_path.exists()
    journal = Journal(journal_path, settings.root, readonly=True) if exists else None
    retention = None
    try:
        if journal is not None and settings.retention.enabled:
            retention = retention_status(settings, journal, now)
        records = journal.destinations() if journal else {}
        replaced = journal is not None and root_replaced(settings.root, journal)
        owners = read_owner_records(settings.state_dir)
        out = []
        for dest in settings.destinations:
            entries = journal.entries(dest.name) if journal else {}
            n_files = n_bytes = n_invalid = 0
            oldest: float | None = None
            for rel, st in files:
                f, b, since, invalid = _pending(settings.root, rel, st, entries.get(rel))
                n_files += f
                n_bytes += b
                n_invalid += invalid
                if since is not None:
                    oldest = since if oldest is None else min(oldest, since)
            record = records.get(dest.name)
            owner = (
                owners.get(dest.name) if owners.get(dest.name, {}).get("url") == dest.url else None
            )
            out.append(
                DestinationStatus(
                    name=dest.name,
                    url=dest.url,
                    state=record.state if record else "unknown",
                    pending_files=n_files,
                    pending_bytes=n_bytes,
                    oldest_unsynced_s=max(0.0, now - oldest) if oldest is not None else None,
                    invalid_files=n_invalid,
                    last_success=record.last_success if record else None,
                    last_error=record.last_error if record else None,
                    last_error_at=record.last_error_at if record else None,
                    owner_host=owner.get("host") if owner else None,
                    owner_is_this_host=owner.get("mine") if owner else None,
                    owner_claimed_at=owner.get("claimed_at") if owner else None,
                    owner_checked_at=owner.get("checked_at") if owner else None,
                )
            )
    finally:
        if journal is not None:
            journal.close()
    return StatusReport(
        root=str(settings.root),
        journal=str(journal_path),
        journal_exists=exists,
        files=len(files) + len(bad),
        destinations=out,
        retention=retention,
        not_mirrorable={display_path(rel): why for rel, why in sorted(bad.items())},
        root_replaced=replaced,
    )


def retention_status(settings: Settings, journal: Journal, now: float) -> dict[str, Any]:
    """Retention as the journal and the disk show it (no request): bytes held locally,
    evictable, evicted, and why the oldest finalized run still on disk is kept."""
    from evalsyncd.sync.retention import Mirror, Retention
    from evalsyncd.sync.service import open_destination_storage

    records = journal.destinations()
    mirrors = [
        Mirror(
            d.name,
            open_destination_storage(d),
            records[d.name].state if d.name in records else "unknown",
        )
        for d in settings.destinations
    ]
    retention = Retention(
        settings.root, settings.retention, journal, lambda: mirrors, clock=lambda: now
    )
    report, _ = retention.assess()
    kept = report.oldest_kept
    return {
        "local_bytes": report.local_bytes,
        "evictable_bytes": report.evictable_bytes,
        "evicted_bytes": report.evicted_bytes,
        "evicted_runs": report.evicted_runs,
        "used_share": report.usage.share if report.usage is not None else None,
        "oldest_kept": None if kept is None else {"run_id": kept.run_id, "why": kept.blocker},
    }


def format_bytes(n: int) -> str:
    """``n`` bytes for humans: ``512 B``, ``1.5 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    iso = datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return f"{iso} ({_duration(max(0.0, now - ts))} ago)"


def _owner(d: DestinationStatus, now: float) -> str:
    """The owner line of a destination (see :mod:`evalsyncd.sync.owner`)."""
    if d.owner_is_this_host is None:
        return "not checked yet (the daemon claims the prefix before its first write)"
    who = f"host {d.owner_host}" if d.owner_host else "another evalsyncd (no claim)"
    if d.owner_is_this_host:
        who = f"this host ({d.owner_host})"
    since = f", claimed {_when(d.owner_claimed_at, now)}" if d.owner_claimed_at else ""
    tail = "" if d.owner_is_this_host else ": this host writes nothing there"
    return f"{who}{since}{tail}"


_SHOWN = 10


def format_status(report: StatusReport, *, now: float | None = None) -> str:
    """Human-readable text of a report, one block per destination."""
    now = time.time() if now is None else now
    lines = [f"root {report.root}: {report.files} files"]
    if not report.journal_exists:
        lines.append(f"journal {report.journal}: none yet (the daemon has not run)")
    if report.root_replaced:
        lines.append(
            "root replaced: not the directory the journal mirrored (device and inode differ: "
            "a volume not mounted, a moved root); files missing from it are left as they "
            "were at the destinations. Mount the volume (a running daemon adopts it); or, "
            "if this is the root now, stop the daemon, run evalsyncd sync --once "
            "--adopt-root and start it again"
        )
    if report.not_mirrorable:
        lines.append(
            f"not mirrorable: {len(report.not_mirrorable)} files, never uploaded "
            "(rename them to mirror them):"
        )
        shown = list(report.not_mirrorable.items())[:_SHOWN]
        lines += [f"  {path}: {why}" for path, why in shown]
        if len(report.not_mirrorable) > _SHOWN:
            lines.append(f"  ... and {len(report.not_mirrorable) - _SHOWN} more (--json lists all)")
    for d in report.destinations:
        lines.append(f"{d.name} ({d.url}): {d.state}")
        if d.pending_files:
            oldest = _duration(d.oldest_unsynced_s or 0.0)
            lines.append(
                f"  pending: {d.pending_files} files, {format_bytes(d.pending_bytes)}, oldest {oldest}"
            )
        else:
            lines.append("  pending: nothing, in sync")
        if d.invalid_files:
            lines.append(f"  not uploaded: {d.invalid_files} unparseable .json files")
        lines.append(f"  owner: {_owner(d, now)}")
        lines.append(f"  last success: {_when(d.last_success, now)}")
        if d.last_error:
            lines.append(f"  last error: {d.last_error} at {_when(d.last_error_at, now)}")
    r = report.retention
    if r is not None:
        lines.append(
            f"retention: {format_bytes(r['local_bytes'])} held locally, "
            f"{format_bytes(r['evictable_bytes'])} evictable, "
            f"{format_bytes(r['evicted_bytes'])} evicted ({r['evicted_runs']} runs)"
        )
        if r["oldest_kept"] is not None:
            kept = r["oldest_kept"]
            lines.append(f"  oldest finalized run kept: {kept['run_id']}: {kept['why']}")
    return "\n".join(lines)
