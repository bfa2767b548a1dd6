"""The per-file sample index, kept in an SQLite file on local disk.

One row per sample of a ``trajectories.jsonl`` (:class:`~evalsyncd.samples.lines.SampleEntry`:
line number, byte offset and length, ``idx``, ``example_id``, ``reward``,
``correct``, a short ``error``) and one per bad line, keyed by the object's URL.
The reader (:class:`~evalsyncd.samples.reader.SampleReader`) builds it by
streaming the file once, and extends it as the file grows: the file is
append-only, so the indexed prefix is checked unchanged (the CRC-32 of its
last :attr:`LineScanner.TAIL_BYTES <evalsyncd.samples.lines.LineScanner.TAIL_BYTES>`
bytes, and a file no shorter than the prefix) and only the new bytes are read;
otherwise the file was truncated or replaced, and its index is rebuilt.

The cache lives in ``$EVALSYNCD_CACHE_DIR``, else ``$XDG_CACHE_HOME/evalsyncd``,
else ``~/.cache/evalsyncd`` (:func:`default_cache_dir`), in ``samples.sqlite3``
(WAL mode: several readers and processes may share it). It holds only what can
be rebuilt from the bucket; deleting it is always safe.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from evalsyncd.samples.lines import BadLine, SampleEntry, SampleFilter

__all__ = ["CACHE_FILE", "FileState", "IndexCache", "SampleIndex", "default_cache_dir"]

CACHE_FILE = "samples.sqlite3"
"""Name of the SQLite file inside the cache directory."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    url TEXT NOT NULL UNIQUE,
    indexed_bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    tail_crc INTEGER NOT NULL,
    tail_len INTEGER NOT NULL,
    complete INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
    file INTEGER NOT NULL,
    line INTEGER NOT NULL,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    example_id TEXT NOT NULL,
    reward REAL NOT NULL,
    correct INTEGER NOT NULL,
    err INTEGER NOT NULL,
    error TEXT,
    PRIMARY KEY (file, line)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_correct ON samples (file, correct, err, line);
CREATE INDEX IF NOT EXISTS samples_err ON samples (file, err, line);
CREATE TABLE IF NOT EXISTS bad_lines (
    file INTEGER NOT NULL,
    line INTEGER NOT NULL,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (file, line)
) WITHOUT ROWID;
"""

_WHERE = {
    SampleFilter.ALL: "",
    SampleFilter.CORRECT: " AND correct = 1",
    SampleFilter.INCORRECT: " AND correct = 0 AND err = 0",
    SampleFilter.ERRORS: " AND err = 1",
}

_COLUMNS = "line, start, length, idx, example_id, reward, correct, error"


def default_cache_dir() -> Path:
    """``$EVALSYNCD_CACHE_DIR``, else ``$XDG_CACHE_HOME/evalsyncd``, else ``~/.cache/evalsyncd``."""
    if env := os.environ.get("EVALSYNCD_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "evalsyncd"


@dataclass(frozen=True, slots=True)
class FileState:
    """How far one file is indexed.

    Attributes:
        file_id: its row in the cache.
        url: the object's URL.
        indexed_bytes: bytes indexed (the end of the last complete line).
        lines: lines indexed (the next line's 0-based number).
        tail_crc: CRC-32 of the ``tail_len`` bytes before ``indexed_bytes``.
        tail_len: bytes that ``tail_crc`` covers.
        complete: the last build read to the end of the file.
    """

    file_id: int
    url: str
    indexed_bytes: int
    lines: int
    tail_crc: int
    tail_len: int
    complete: bool


def _entry(row: tuple[int, int, int, int, str, float, int, str | None]) -> SampleEntry:
    line, start, length, idx, example_id, reward, correct, error = row
    return SampleEntry(line, start, length, idx, example_id, reward, bool(correct), error)


_SETTERS = tuple(
    getattr(SampleEntry, name).__set__
    for name in ("line", "start", "length", "idx", "example_id", "reward", "correct", "error")
)


def _entries(rows: list[tuple[object, ...]]) -> list[SampleEntry]:
    """:func:`_entry` of many rows, about twice as fast (the slots set directly)."""
    new = object.__new__
    s0, s1, s2, s3, s4, s5, s6, s7 = _SETTERS
    out: list[SampleEntry] = []
    add = out.append
    for line, start, length, idx, example_id, reward, correct, error in rows:
        e = new(SampleEntry)
        s0(e, line)
        s1(e, start)
        s2(e, length)
        s3(e, idx)
        s4(e, example_id)
        s5(e, reward)
        s6(e, correct == 1)
        s7(e, error)
        add(e)
    return out


class IndexCache:
    """The SQLite file holding every indexed file's rows.

    Args:
        directory: where ``samples.sqlite3`` lives (created if missing).

    Raises:
        OSError: the directory cannot be created.
        sqlite3.Error: the file is not a usable SQLite database.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / CACHE_FILE
        self._lock = threading.Lock()
        with closing(self.connect()) as db, db:
            db.executescript(_SCHEMA)

    def connect(self) -> sqlite3.Connection:
        """A new connection (WAL, 30 s busy timeout); usable from any one thread at a time."""
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def state(self, url: str) -> FileState | None:
        """How far ``url`` is indexed, or ``None`` if it never was."""
        with self._lock, closing(self.connect()) as db, db:
            row = db.execute(
                "SELECT id, url, indexed_bytes, lines, tail_crc, tail_len, complete "
                "FROM files WHERE url = ?",
                (url,),
            ).fetchone()
        if row is None:
            return None
        return FileState(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]))

    def reset(self, url: str) -> FileState:
        """Forget every row of ``url`` and start it afresh (nothing indexed)."""
        with self._lock, closing(self.connect()) as db, db:
            row = db.execute("SELECT id FROM files WHERE url = ?", (url,)).fetchone()
            if row is not None:
                db.execute("DELETE FROM samples WHERE file = ?", (row[0],))
                db.execute("DELETE FROM bad_lines WHERE file = ?", (row[0],))
                db.execute("DELETE FROM files WHERE id = ?", (row[0],))
            cur = db.execute(
                "INSERT INTO files (url, indexed_bytes, lines, tail_crc, tail_len, complete) "
                "VALUES (?, 0, 0, 0, 0, 0)",
                (url,),
            )
            file_id = cur.lastrowid
        assert file_id is not None
        return FileState(file_id, url, 0, 0, 0, 0, False)

    def add(self, state: FileState, entries: Iterable[SampleEntry], bad: Iterable[BadLine]) -> None:
        """Add rows of one file and record its new ``state``, in one transaction."""
        fid = state.file_id
        with self._lock, closing(self.connect()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        fid,
                        e.line,
                        e.start,
                        e.length,
                        e.idx,
                        e.example_id,
                        e.reward,
                        int(e.correct),
                        int(e.error is not None),
                        e.error,
                    )
                    for e in entries
                ),
            )
            db.executemany(
                "INSERT OR REPLACE INTO bad_lines VALUES (?, ?, ?, ?, ?)",
                ((fid, b.line, b.start, b.length, b.reason) for b in bad),
            )
            db.execute(
                "UPDATE files SET indexed_bytes = ?, lines = ?, tail_crc = ?, tail_len = ?, "
                "complete = ? WHERE id = ?",
                (
                    state.indexed_bytes,
                    state.lines,
                    state.tail_crc,
                    state.tail_len,
                    int(state.complete),
                    fid,
                ),
            )


class SampleIndex:
    """A snapshot of one file's index: counts and pages of its samples, in file order.

    Made by :meth:`SampleReader.aindex <evalsyncd.samples.reader.SampleReader.aindex>`.
    Queries are synchronous and local (SQLite, milliseconds); they see the rows
    present when the snapshot was taken plus any added since (never fewer).

    Attributes:
        url: the file's URL.
        indexed_bytes: bytes of the file indexed (up to the end of its last complete line).
        complete: the whole file, as it was when read, is indexed (only an
            unfinished last line, a write in progress, may be left out).
        exists: the file existed when read (a missing file is an empty index).
    """

    def __init__(
        self,
        cache: IndexCache | None,
        state: FileState | None,
        *,
        exists: bool = True,
        url: str = "",
    ) -> None:
        self._cache = cache
        self._state = state
        self.url = state.url if state is not None else url
        self.indexed_bytes = state.indexed_bytes if state is not None else 0
        self.complete = state.complete if state is not None else True
        self.exists = exists
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SampleIndex({self.url!r}, indexed_bytes={self.indexed_bytes})"

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        if self._cache is None or self._state is None:
            return []
        with self._lock:
            if self._db is None:
                self._db = self._cache.connect()
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        """Close the snapshot's database connection (reopened on the next query)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @property
    def _fid(self) -> int:
        return self._state.file_id if self._state is not None else -1

    def count(self, filter: SampleFilter = SampleFilter.ALL) -> int:
        """Number of samples that pass ``filter``, up to :attr:`indexed_bytes`."""
        sql = f"SELECT count(*) FROM samples WHERE file = ? AND start < ?{_WHERE[SampleFilter(filter)]}"
        rows = self._query(sql, (self._fid, self.indexed_bytes))
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]

    def counts(self) -> dict[SampleFilter, int]:
        """:meth:`count` of every filter."""
        return {f: self.count(f) for f in SampleFilter}

    def page(
        self, number: int, size: int, filter: SampleFilter = SampleFilter.ALL
    ) -> list[SampleEntry]:
        """The ``number``-th page (0-based) of ``size`` samples passing ``filter``.

        Returns:
            Up to ``size`` entries in file order; ``[]`` past the last page.

        Raises:
            ValueError: ``number`` is negative, ``size`` is below 1, or ``filter`` is not
                a :class:`SampleFilter` value.
        """
        if number < 0 or size < 1:
            raise ValueError(f"page number must be >= 0 and size >= 1, not {number}, {size}")
        return self._entries(SampleFilter(filter), size, number * size)

    def _entries(self, filter: SampleFilter, limit: int, offset: int) -> list[SampleEntry]:
        sql = (
            f"SELECT {_COLUMNS} FROM samples WHERE file = ? AND start < ?{_WHERE[filter]} "
            "ORDER BY line LIMIT ? OFFSET ?"
        )
        rows = self._query(sql, (self._fid, self.indexed_bytes, limit, offset))
        return [_entry(r) for r in rows]  # type: ignore[arg-type]

    def entries(
        self, filter: SampleFilter = SampleFilter.ALL, *, batch: int = 10_000
    ) -> Iterator[SampleEntry]:
        """Every sample passing ``filter``, in file order (fetched ``batch`` rows at a time)."""
        where = _WHERE[SampleFilter(filter)]
        last = -1
        while True:
            sql = (
                f"SELECT {_COLUMNS} FROM samples WHERE file = ? AND start < ? AND line > ?"
                f"{where} ORDER BY line LIMIT ?"
            )
            rows = self._query(sql, (self._fid, self.indexed_bytes, last, batch))
            yield from _entries(rows)
            if len(rows) < batch:
                return
            last = int(rows[-1][0])  # type: ignore[call-overload]

    def columns(self) -> tuple[list[str], list[int], list[int], list[float], list[int]]:
        """Every sample as columns, in file order: what a comparison needs, without one
        object per sample.

        Returns:
            ``(example_ids, idxs, outcomes, rewards, lines)``; an outcome is
            ``correct + 2 * errored`` (0 to 3).
        """
        rows = self._query(
            "SELECT example_id, idx, correct + 2 * err, reward, line FROM samples "
            "WHERE file = ? AND start < ? ORDER BY line",
            (self._fid, self.indexed_bytes),
        )
        if not rows:
            return [], [], [], [], []
        example_ids, idxs, outcomes, rewards, lines = zip(*rows, strict=True)
        return (
            list(example_ids),
            list(idxs),
            list(outcomes),
            list(rewards),
            list(lines),
        )

    def find_many(self, lines: Sequence[int]) -> dict[int, SampleEntry]:
        """The samples at these 0-based lines, by line (lines that are no sample are absent)."""
        out: dict[int, SampleEntry] = {}
        wanted = sorted(set(lines))
        for lo in range(0, len(wanted), 500):
            part = wanted[lo : lo + 500]
            sql = (
                f"SELECT {_COLUMNS} FROM samples WHERE file = ? AND start < ? "
                f"AND line IN ({', '.join('?' * len(part))})"
            )
            for e in _entries(self._query(sql, (self._fid, self.indexed_bytes, *part))):
                out[e.line] = e
        return out

    def find(self, line: int) -> SampleEntry | None:
        """The sample at 0-based ``line``, or ``None`` (no such line, or not a sample)."""
        sql = f"SELECT {_COLUMNS} FROM samples WHERE file = ? AND line = ? AND start < ?"
        rows = self._query(sql, (self._fid, line, self.indexed_bytes))
        return _entry(rows[0]) if rows else None  # type: ignore[arg-type]

    def bad_lines(self, limit: int = 100, offset: int = 0) -> list[BadLine]:
        """Lines that are not samples, or samples with a defect, in file order."""
        rows = self._query(
            "SELECT line, start, length, reason FROM bad_lines WHERE file = ? AND start < ? "
            "ORDER BY line LIMIT ? OFFSET ?",
            (self._fid, self.indexed_bytes, limit, offset),
        )
        return [BadLine(r[0], r[1], r[2], r[3], self.url) for r in rows]  # type: ignore[arg-type]

    def bad_line_count(self) -> int:
        """Number of :meth:`bad_lines`."""
        rows = self._query(
            "SELECT count(*) FROM bad_lines WHERE file = ? AND start < ?",
            (self._fid, self.indexed_bytes),
        )
        return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]
