"""The journal: what each destination has acknowledged, in SQLite (WAL).

File ``{state_dir}/journal.sqlite3``. Schema (version 3)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        schema_version = "3", root = the watched root it belongs to,
        tail_writer = this state directory's writer id in tail logs
    entries(                      one row per (destination, file)
        destination TEXT, path TEXT,            -- relative POSIX path under the root
        dev INTEGER, ino INTEGER,               -- identity of the local file mirrored
        acked_offset INTEGER,                   -- bytes the destination confirmed in the main object
        fingerprint INTEGER,                    -- CRC32C of the <= 4 KiB before tail_offset
        content_crc INTEGER,                    -- replace-on-write: CRC32C of the newest content sent
        remote_version TEXT,                    -- main object's ETag or generation at acked_offset
        seen_size INTEGER, seen_mtime_ns INTEGER,  -- local stat when last synced (change detection)
        status TEXT,                            -- 'ok', 'invalid' (unparseable JSON), 'deleted'
        acked_at REAL,                          -- Unix time of the last acknowledgement, seconds
        tail_offset INTEGER,                    -- bytes confirmed in the tail log or the main
                                                --   object (>= acked_offset): what readers see
        tail_since REAL,                        -- Unix time the main object fell behind the tail;
                                                --   NULL when the main object is up to date
        PRIMARY KEY (destination, path))
    destinations(name TEXT PRIMARY KEY, state TEXT, last_success REAL,
                 last_error TEXT, last_error_at REAL, updated_at REAL)
    evictions(                    one row per run evicted from the local disk (retention)
        run_id TEXT PRIMARY KEY,
        state TEXT,                             -- 'intent' (deleting), 'evicted' (done)
        files TEXT,                             -- JSON [[path, size, crc32c], ...]: the files
                                                --   proven safe, that the eviction deletes
        rows TEXT,                              -- JSON: their entries rows, taken out of
                                                --   `entries` with the intent (for a rollback)
        bytes INTEGER,                          -- their total size, bytes
        reason TEXT,                            -- why the run went ('max_age_s', 'high_water')
        started_at REAL, evicted_at REAL)       -- Unix times, seconds

Rules (``docs/design.md``, "The journal"): an offset advances only after the
destination acknowledged the write, in the same transaction as the version it
returned: ``tail_offset`` when a tail object holding the bytes was created,
``acked_offset`` when the main object holds them. Version 1 journals are
upgraded in place (``tail_offset = acked_offset``), and version 2 ones by adding
the ``evictions`` table (:mod:`evalsyncd.sync.retention` says how it is used:
an ``intent`` row is written, with the run's ``entries`` rows taken out, in one
transaction before any local byte of the run is deleted). Acknowledgements are grouped: :meth:`Journal.ack` writes into an open
transaction that :meth:`Journal.commit` ends (the daemon commits after every
upload phase, and ``ack`` itself commits once 256 rows or 0.5 s are pending).
Losing uncommitted acknowledgements (``kill -9``, power loss with
``synchronous=NORMAL``) is safe: the next run re-sends those writes, and
conditional appends reconcile them against the remote size, so nothing is
duplicated. Several processes may open the journal at once (``evalsyncd
status`` reads it while the daemon runs).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Self

from evalsyncd.errors import JournalError

__all__ = [
    "DestinationRecord",
    "Entry",
    "EntryStatus",
    "Eviction",
    "Journal",
    "JournalError",
]

SCHEMA_VERSION = "3"

_TABLES = ("meta", "entries", "destinations", "evictions")

# One transaction: a reader never sees some tables without the others, or the
# tables without a schema version (a version-1 journal keeps its "1").
_SCHEMA = f"""
BEGIN;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    acked_offset INTEGER NOT NULL,
    fingerprint INTEGER,
    content_crc INTEGER,
    remote_version TEXT,
    seen_size INTEGER NOT NULL,
    seen_mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',
    acked_at REAL NOT NULL,
    tail_offset INTEGER NOT NULL DEFAULT 0,
    tail_since REAL,
    PRIMARY KEY (destination, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS destinations (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    last_success REAL,
    last_error TEXT,
    last_error_at REAL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evictions (
    run_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    files TEXT NOT NULL,
    rows TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    reason TEXT NOT NULL,
    started_at REAL NOT NULL,
    evicted_at REAL
);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
COMMIT;
"""


class EntryStatus(enum.StrEnum):
    """What a journal row says of its file (column ``entries.status``): ``ok``, the
    destination holds the file up to the row's offsets; ``invalid``, a ``.json`` that
    did not parse past its grace period (reported, not uploaded); ``deleted``, deleted
    locally with the remote object kept (``mirror_deletes`` off)."""

    OK = "ok"
    INVALID = "invalid"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal row; see the module docstring for the meaning of each field."""

    destination: str
    path: str
    dev: int
    ino: int
    acked_offset: int
    fingerprint: int | None
    content_crc: int | None
    remote_version: str | None
    seen_size: int
    seen_mtime_ns: int
    status: EntryStatus
    acked_at: float
    tail_offset: int = -1
    """Bytes readers see (tail log or main object); ``-1`` in a new row means
    ``acked_offset`` (no tail log in use)."""
    tail_since: float | None = None

    def __post_init__(self) -> None:
        if self.tail_offset < 0:
            object.__setattr__(self, "tail_offset", self.acked_offset)
        object.__setattr__(self, "status", EntryStatus(self.status))

    def unchanged(self, st: os.stat_result) -> bool:
        """Whether the local file is as it was when last synced (same inode, size, mtime)."""
        return self.status is not EntryStatus.DELETED and (
            self.dev,
            self.ino,
            self.seen_size,
            self.seen_mtime_ns,
        ) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @property
    def main_behind(self) -> bool:
        """Whether the main object lags the tail log for this file."""
        return self.tail_since is not None


@dataclass(frozen=True, slots=True)
class DestinationRecord:
    """A destination's last known state, as the daemon recorded it."""

    name: str
    state: str
    last_success: float | None
    last_error: str | None
    last_error_at: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class Eviction:
    """One row of ``evictions``: a run being, or already, evicted from the local disk.

    Attributes:
        run_id: the run.
        state: ``"intent"`` (its files are being deleted) or ``"evicted"``.
        files: ``(path, size in bytes, CRC32C)`` of each file proven safe and deleted.
        rows: the run's ``entries`` rows taken out with the intent (restored by a rollback).
        bytes: total size of ``files``, bytes.
        reason: why the run went (``"max_age_s"``, ``"high_water"``, ``"abandoned"``, ...).
        started_at: Unix time of the intent, seconds.
        evicted_at: Unix time the last file went, seconds (``None`` while an intent).
    """

    run_id: str
    state: str
    files: tuple[tuple[str, int, int], ...]
    rows: tuple[Entry, ...]
    bytes: int
    reason: str
    started_at: float
    evicted_at: float | None


_ROWS_PER_QUERY = 500
"""Paths per query of :meth:`Journal.rows` (SQLite allows 999 parameters at least)."""
_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
_ENTRY_COLUMNS = ", ".join(_ENTRY_FIELDS)
_ENTRY_MARKS = ", ".join("?" for _ in _ENTRY_FIELDS)
_RECORD_COLUMNS = ", ".join(f.name for f in fields(DestinationRecord))


def _utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates), as SQLite stores text."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _by_name(row: sqlite3.Row) -> dict[str, Any]:
    """A row as ``{column: value}``: rows are built by column name, never by position."""
    return dict(zip(row.keys(), row, strict=True))


class Journal:
    """The SQLite journal. Thread-safe; one connection guarded by a lock.

    Args:
        path: the database file (created if missing, with its directory).
        root: the watched root this journal belongs to; a journal created for
            another root is refused (``JournalError``), so two daemons cannot
            share a state directory by mistake.
        readonly: open for reading only (``evalsyncd status``), writing nothing but
            refusing what the daemon's open refuses (and a version-1 journal, which
            only the daemon upgrades) and a journal missing one of its tables.

    Raises:
        JournalError: on corruption, a root mismatch or an unknown schema version;
            also from the read methods when SQLite fails to read (the message
            names the file).
    """

    MAX_PENDING_ROWS = 256
    MAX_PENDING_S = 0.5

    def __init__(self, path: Path, root: Path | None = None, *, readonly: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._pending_rows = 0
        self._pending_since = 0.0
        self._has_evictions = True
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=10.0
                )
                self._db.row_factory = sqlite3.Row
                self._check_readable(root)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    path, check_same_thread=False, timeout=10.0, isolation_level=None
                )
                self._db.row_factory = sqlite3.Row
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._check_meta(root)
        except BaseException as exc:
            if hasattr(self, "_db"):
                self._db.close()  # a refused journal is not left open
            if isinstance(exc, sqlite3.DatabaseError):
                raise JournalError(f"{path}: cannot open the journal: {exc}") from exc
            raise

    def _check_meta(self, root: Path | None) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema_version")
        if version == "1":
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
            self._db.execute("BEGIN")
            if "tail_offset" not in columns:
                self._db.execute(
                    "ALTER TABLE entries ADD COLUMN tail_offset INTEGER NOT NULL DEFAULT 0"
                )
                self._db.execute("ALTER TABLE entries ADD COLUMN tail_since REAL")
            self._db.execute("UPDATE entries SET tail_offset = acked_offset")
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,)
            )
            self._db.execute("COMMIT")
        elif version == "2":  # the evictions table was created by _SCHEMA's IF NOT EXISTS
            self._db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,)
            )
        elif version != SCHEMA_VERSION:
            raise self._unknown_schema(version)
        if root is not None:
            known = meta.get("root")
            if known is None:
                self._db.execute("INSERT INTO meta VALUES ('root', ?)", (str(root),))
            else:
                self._check_root(known, root)

    def _check_readable(self, root: Path | None) -> None:
        """What the daemon's open checks, without writing: every table, the current
        schema version and (given ``root``) the root; a version-1 journal is refused
        until the daemon upgrades it (its rows lack the tail columns)."""
        names = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master")}
        # a version-2 journal (not yet upgraded by the daemon) has no evictions table
        self._has_evictions = "evictions" in names
        missing = [t for t in _TABLES if t not in names and t != "evictions"]
        if missing:
            raise JournalError(
                f"{self.path}: not an evalsyncd journal, or damaged: no table {', '.join(missing)}"
            )
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema_version")
        if version == "1":
            raise JournalError(
                f"{self.path}: journal schema 1, not yet upgraded to {SCHEMA_VERSION}; "
                "start the daemon once (evalsyncd run or sync --once) to upgrade it"
            )
        if version not in ("2", SCHEMA_VERSION):
            raise self._unknown_schema(version)
        known = meta.get("root")
        if root is not None and known is not None:
            self._check_root(known, root)

    def _unknown_schema(self, version: str | None) -> JournalError:
        return JournalError(
            f"{self.path}: journal schema {version}, this evalsyncd knows {SCHEMA_VERSION}"
        )

    def _check_root(self, known: str, root: Path) -> None:
        if known != str(root):
            raise JournalError(
                f"{self.path}: this state directory belongs to root {known}, not {root}; "
                "give each watched root its own state_dir"
            )

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; a damaged database is a :class:`JournalError`.

        Raises:
            JournalError: SQLite failed to read (corruption, a dropped table, I/O).
        """
        with self._lock:
            try:
                yield self._db
            except sqlite3.DatabaseError as exc:
                raise JournalError(f"{self.path}: cannot read the journal: {exc}") from exc

    def writer_id(self) -> str:
        """This state directory's id in tail logs (created on first use, then kept)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'tail_writer'").fetchone()
            if row is not None:
                return str(row[0])
            writer = secrets.token_hex(8)
            self._db.execute("INSERT INTO meta VALUES ('tail_writer', ?)", (writer,))
            return writer

    def root_identity(self) -> tuple[int, int] | None:
        """``(st_dev, st_ino)`` of the watched root this journal mirrored, as
        :meth:`record_root_identity` kept it; ``None`` before the first record."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'root_id'").fetchone()
        dev, _, ino = str(row[0] if row is not None else "").partition(":")
        if not (dev.isdigit() and ino.isdigit()):
            return None  # none recorded (or not one this code wrote): the next start records it
        return int(dev), int(ino)

    def has_live_rows(self) -> bool:
        """Whether any destination's row names a file not known as deleted."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM entries WHERE status != ? LIMIT 1", (EntryStatus.DELETED.value,)
            ).fetchone()
        return row is not None

    def record_root_identity(self, identity: tuple[int, int]) -> None:
        """Keep ``(st_dev, st_ino)`` as the watched root's identity (meta ``root_id``)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('root_id', ?)",
                (f"{identity[0]}:{identity[1]}",),
            )

    def close(self) -> None:
        """Commit what is pending and close the connection."""
        self.commit()
        with self._lock:
            self._db.close()

    def abandon(self) -> None:
        """Close without committing: pending acknowledgements are lost, as under ``kill -9``
        (for crash simulations; the daemon itself always calls :meth:`close`)."""
        with self._lock:
            if self._db.in_transaction:
                self._db.rollback()
            self._db.close()

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        """Execute a write inside the open transaction (caller holds the lock)."""
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
            self._pending_since = time.monotonic()
        self._db.execute(sql, params)
        self._pending_rows += 1
        if (
            self._pending_rows >= self.MAX_PENDING_ROWS
            or time.monotonic() - self._pending_since > self.MAX_PENDING_S
        ):
            self._commit_locked()

    def _commit_locked(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._pending_rows = 0

    def commit(self) -> None:
        """Commit the acknowledgements written since the last commit."""
        with self._lock:
            self._commit_locked()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- entries -------------------------------------------------------------------

    def get(self, destination: str, path: str) -> Entry | None:
        """The row of one file at one destination, or ``None``."""
        with self._reading() as db:
            row = db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE destination = ? AND path = ?",
                (destination, path),
            ).fetchone()
        return Entry(**_by_name(row)) if row else None

    def rows(self, destination: str, paths: Sequence[str]) -> dict[str, Entry]:
        """The rows of ``paths`` at one destination (those it has), by path: one query
        per 500 paths instead of one per path (a pass over a backlog). A path that is no
        UTF-8 (a file name's undecodable bytes, kept as surrogates) has no row: it is
        never mirrored, so never journaled."""
        found: dict[str, Entry] = {}
        paths = [p for p in paths if p.isascii() or _utf8(p)]
        with self._reading() as db:
            for i in range(0, len(paths), _ROWS_PER_QUERY):
                chunk = paths[i : i + _ROWS_PER_QUERY]
                marks = ", ".join("?" * len(chunk))
                for row in db.execute(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries "
                    f"WHERE destination = ? AND path IN ({marks})",
                    (destination, *chunk),
                ):
                    found[row["path"]] = Entry(**_by_name(row))
        return found

    def entries(self, destination: str) -> dict[str, Entry]:
        """Every row of a destination, by path."""
        with self._reading() as db:
            rows = db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE destination = ?", (destination,)
            ).fetchall()
        return {row["path"]: Entry(**_by_name(row)) for row in rows}

    def ack(self, entry: Entry) -> None:
        """Record an acknowledged write (insert or replace the row); see :meth:`commit`."""
        with self._lock:
            self._write(
                f"INSERT OR REPLACE INTO entries ({_ENTRY_COLUMNS}) VALUES ({_ENTRY_MARKS})",
                tuple(getattr(entry, name) for name in _ENTRY_FIELDS),
            )

    def forget(self, destination: str, path: str) -> None:
        """Delete the row of one file (after a mirrored delete)."""
        with self._lock:
            self._db.execute(
                "DELETE FROM entries WHERE destination = ? AND path = ?", (destination, path)
            )

    def forget_destination(self, destination: str) -> None:
        """Delete every row of a destination that was removed from the configuration."""
        with self._lock:
            self._write("DELETE FROM entries WHERE destination = ?", (destination,))
            self._write("DELETE FROM destinations WHERE name = ?", (destination,))
            self._commit_locked()

    # -- destination state ------------------------------------------------------------

    def set_destination_state(
        self, name: str, state: str, *, success: bool = False, error: str | None = None
    ) -> None:
        """Record a destination's state, and its last success or error."""
        now = time.time()
        with self._lock:
            self._write(
                """INSERT INTO destinations (name, state, last_success, last_error, last_error_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET
                     state = excluded.state,
                     last_success = COALESCE(excluded.last_success, last_success),
                     last_error = COALESCE(excluded.last_error, last_error),
                     last_error_at = COALESCE(excluded.last_error_at, last_error_at),
                     updated_at = excluded.updated_at""",
                (name, state, now if success else None, error, now if error else None, now),
            )
            self._commit_locked()

    def destinations(self) -> dict[str, DestinationRecord]:
        """Every destination's recorded state, by name."""
        with self._reading() as db:
            rows = db.execute(f"SELECT {_RECORD_COLUMNS} FROM destinations").fetchall()
        return {row["name"]: DestinationRecord(**_by_name(row)) for row in rows}

    # -- evictions (retention) -----------------------------------------------------------

    def evictions(self) -> dict[str, Eviction]:
        """Every eviction row (intents and evicted runs), by run id."""
        if not self._has_evictions:
            return {}
        with self._reading() as db:
            rows = db.execute(
                "SELECT run_id, state, files, rows, bytes, reason, started_at, evicted_at "
                "FROM evictions"
            ).fetchall()
        return {row["run_id"]: _eviction_of(row) for row in rows}

    def begin_eviction(
        self, run_id: str, files: list[tuple[str, int, int]], reason: str, now: float
    ) -> list[Entry]:
        """Write the intent to evict ``run_id`` and take its files' rows out of ``entries``,
        in one transaction (committed before this returns).

        Args:
            run_id: the run.
            files: ``(relative path, size, CRC32C)`` of each file to delete.
            reason: why (for status and logs).
            now: Unix time, seconds.

        Returns:
            The rows taken out (every destination's), kept in the intent for a rollback.
        """
        paths = [p for p, _, _ in files]
        with self._lock:
            self._commit_locked()
            # durable before any file goes, even on power loss (WAL fsync at commit)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                taken: list[Entry] = []
                for path in paths:
                    rows = self._db.execute(
                        f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE path = ?", (path,)
                    ).fetchall()
                    taken.extend(Entry(**_by_name(r)) for r in rows)
                    self._db.execute("DELETE FROM entries WHERE path = ?", (path,))
                self._db.execute(
                    "INSERT OR REPLACE INTO evictions VALUES (?, 'intent', ?, ?, ?, ?, ?, NULL)",
                    (
                        run_id,
                        json.dumps(files),
                        json.dumps([[getattr(e, n) for n in _ENTRY_FIELDS] for e in taken]),
                        sum(size for _, size, _ in files),
                        reason,
                        now,
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")
        return taken

    def finish_eviction(self, run_id: str, now: float) -> None:
        """Mark the intent of ``run_id`` done: every file of it is deleted (committed)."""
        with self._lock:
            self._commit_locked()
            self._db.execute(
                "UPDATE evictions SET state = 'evicted', evicted_at = ? WHERE run_id = ?",
                (now, run_id),
            )

    def rollback_eviction(self, run_id: str) -> None:
        """Undo the intent of ``run_id``: put its rows back (unless newer ones exist) and
        delete the intent, in one transaction. No-op for an evicted run."""
        with self._lock:
            self._commit_locked()
            row = self._db.execute(
                "SELECT run_id, state, files, rows, bytes, reason, started_at, evicted_at "
                "FROM evictions WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None or row["state"] != "intent":
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for e in _eviction_of(row).rows:
                    self._db.execute(
                        f"INSERT OR IGNORE INTO entries ({_ENTRY_COLUMNS}) VALUES ({_ENTRY_MARKS})",
                        tuple(getattr(e, name) for name in _ENTRY_FIELDS),
                    )
                self._db.execute("DELETE FROM evictions WHERE run_id = ?", (run_id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def forget_eviction(self, run_id: str) -> None:
        """Delete the eviction row of ``run_id`` (the run was restored)."""
        with self._lock:
            self._commit_locked()
            self._db.execute("DELETE FROM evictions WHERE run_id = ?", (run_id,))


def _eviction_of(row: sqlite3.Row) -> Eviction:
    files = tuple((str(p), int(n), int(c)) for p, n, c in json.loads(row["files"]))
    rows = tuple(Entry(**dict(zip(_ENTRY_FIELDS, r, strict=True))) for r in json.loads(row["rows"]))
    return Eviction(
        run_id=row["run_id"],
        state=row["state"],
        files=files,
        rows=rows,
        bytes=int(row["bytes"]),
        reason=row["reason"],
        started_at=float(row["started_at"]),
        evicted_at=row["evicted_at"],
    )
