"""The journal: what each destination has acknowledged, in SQLite (WAL).

File ``{state_dir}/journal.sqlite3``. Schema (version 1)::

    meta(key TEXT PRIMARY KEY, value TEXT)
        schema_version = "1", root = the watched root it belongs to
    entries(                      one row per (destination, file)
        destination TEXT, path TEXT,            -- relative POSIX path under the root
        dev INTEGER, ino INTEGER,               -- identity of the local file mirrored
        acked_offset INTEGER,                   -- bytes the destination confirmed
        fingerprint INTEGER,                    -- CRC32C of the <= 4 KiB before acked_offset
        content_crc INTEGER,                    -- replace-on-write: CRC32C of the uploaded content
        remote_version TEXT,                    -- ETag or generation returned by the write
        seen_size INTEGER, seen_mtime_ns INTEGER,  -- local stat when last synced (change detection)
        status TEXT,                            -- 'ok', 'invalid' (unparseable JSON), 'deleted'
        acked_at REAL,                          -- Unix time of the last acknowledgement, seconds
        PRIMARY KEY (destination, path))
    destinations(name TEXT PRIMARY KEY, state TEXT, last_success REAL,
                 last_error TEXT, last_error_at REAL, updated_at REAL)

Rules (``shared/DESIGN.md`` section 4): an offset advances only after the
destination acknowledged the write, in the same transaction as the version it
returned. Acknowledgements are grouped: :meth:`Journal.ack` writes into an open
transaction that :meth:`Journal.commit` ends (the daemon commits after every
upload phase, and ``ack`` itself commits once 256 rows or 0.5 s are pending).
Losing uncommitted acknowledgements (``kill -9``, power loss with
``synchronous=NORMAL``) is safe: the next run re-sends those writes, and
conditional appends reconcile them against the remote size, so nothing is
duplicated. Several processes may open the journal at once (``evalsyncd
status`` reads it while the daemon runs).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = ["DestinationRecord", "Entry", "Journal", "JournalError"]

SCHEMA_VERSION = "1"

_SCHEMA = """
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
"""


class JournalError(Exception):
    """The journal cannot be opened: corrupt, from another root, or a newer schema."""


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
    status: str
    acked_at: float


@dataclass(frozen=True, slots=True)
class DestinationRecord:
    """A destination's last known state, as the daemon recorded it."""

    name: str
    state: str
    last_success: float | None
    last_error: str | None
    last_error_at: float | None
    updated_at: float


class Journal:
    """The SQLite journal. Thread-safe; one connection guarded by a lock.

    Args:
        path: the database file (created if missing, with its directory).
        root: the watched root this journal belongs to; a journal created for
            another root is refused (``JournalError``), so two daemons cannot
            share a state directory by mistake.
        readonly: open for reading only (``evalsyncd status``).

    Raises:
        JournalError: on corruption, a root mismatch or an unknown schema version.
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
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(
                    path, check_same_thread=False, timeout=10.0, isolation_level=None
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._check_meta(root)
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{path}: cannot open the journal: {exc}") from exc

    def _check_meta(self, root: Path | None) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema_version")
        if version is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            raise JournalError(
                f"{self.path}: journal schema {version}, this evalsyncd knows {SCHEMA_VERSION}"
            )
        if root is not None:
            known = meta.get("root")
            if known is None:
                self._db.execute("INSERT INTO meta VALUES ('root', ?)", (str(root),))
            elif known != str(root):
                raise JournalError(
                    f"{self.path}: this state directory belongs to root {known}, not {root}; "
                    "give each watched root its own state_dir"
                )

    def close(self) -> None:
        """Commit what is pending and close the connection."""
        self.commit()
        with self._lock:
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
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM entries WHERE destination = ? AND path = ?", (destination, path)
            ).fetchone()
        return Entry(*row) if row else None

    def entries(self, destination: str) -> dict[str, Entry]:
        """Every row of a destination, by path."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM entries WHERE destination = ?", (destination,)
            ).fetchall()
        return {row[1]: Entry(*row) for row in rows}

    def ack(self, entry: Entry) -> None:
        """Record an acknowledged write (insert or replace the row); see :meth:`commit`."""
        with self._lock:
            self._write(
                "INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    entry.destination,
                    entry.path,
                    entry.dev,
                    entry.ino,
                    entry.acked_offset,
                    entry.fingerprint,
                    entry.content_crc,
                    entry.remote_version,
                    entry.seen_size,
                    entry.seen_mtime_ns,
                    entry.status,
                    entry.acked_at,
                ),
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
        with self._lock:
            rows = self._db.execute("SELECT * FROM destinations").fetchall()
        return {row[0]: DestinationRecord(*row) for row in rows}
