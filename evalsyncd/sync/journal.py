"""The journal: what each destination has acknowledged, in SQLite (WAL).

File ``{state_dir}/journal.sqlite3``. Schema (version 2)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        schema_version = "2", root = the watched root it belongs to,
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

Rules (``docs/design.md``, "The journal"): an offset advances only after the
destination acknowledged the write, in the same transaction as the version it
returned: ``tail_offset`` when a tail object holding the bytes was created,
``acked_offset`` when the main object holds them. Version 1 journals are
upgraded in place (``tail_offset = acked_offset``). Acknowledgements are grouped: :meth:`Journal.ack` writes into an open
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
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Self

from evalsyncd.errors import JournalError

__all__ = ["DestinationRecord", "Entry", "EntryStatus", "Journal", "JournalError"]

SCHEMA_VERSION = "2"

_TABLES = ("meta", "entries", "destinations")

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


_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
_ENTRY_COLUMNS = ", ".join(_ENTRY_FIELDS)
_ENTRY_MARKS = ", ".join("?" for _ in _ENTRY_FIELDS)
_RECORD_COLUMNS = ", ".join(f.name for f in fields(DestinationRecord))


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
        missing = [t for t in _TABLES if t not in names]
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
        if version != SCHEMA_VERSION:
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
