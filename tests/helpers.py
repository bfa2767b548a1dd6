"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from evalsyncd.errors import TransientStorageError

T = TypeVar("T")


def run_closing(storage: Any, make: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run`` of ``make()``, closing the storage's clients of that loop after."""

    async def main() -> T:
        try:
            return await make()
        finally:
            await storage.aclose()

    return asyncio.run(main())


def lean_put_of(storage: Any) -> Any:
    """The lean ``PutObject`` path of an ``S3Storage``'s client on the bridge loop, opened
    (as the first small ``PutObject`` opens it), or ``None`` where the SDK sends all."""
    from evalsyncd.storage._bridge import run_sync

    async def opened() -> Any:
        return await (await storage._client()).lean_put()

    return run_sync(opened())


def wait_for(
    condition: Callable[[], object],
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
    what: str = "",
) -> object:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout_s`` seconds.

    A condition that fails an ``assert`` or meets a transient storage error (a
    server that just restarted answers 500 for a moment) is asked again."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (AssertionError, TransientStorageError) as exc:
            last_exc, value = exc, None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(
        f"timed out after {timeout_s} s waiting for {what or condition}"
    ) from last_exc


SCHEMA_1_JOURNAL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1'), ('root', '/r');
CREATE TABLE entries (destination TEXT NOT NULL, path TEXT NOT NULL, dev INTEGER NOT NULL,
    ino INTEGER NOT NULL, acked_offset INTEGER NOT NULL, fingerprint INTEGER,
    content_crc INTEGER, remote_version TEXT, seen_size INTEGER NOT NULL,
    seen_mtime_ns INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'ok',
    acked_at REAL NOT NULL, PRIMARY KEY (destination, path)) WITHOUT ROWID;
CREATE TABLE destinations (name TEXT PRIMARY KEY, state TEXT NOT NULL, last_success REAL,
    last_error TEXT, last_error_at REAL, updated_at REAL NOT NULL);
INSERT INTO entries VALUES ('d', 'a.jsonl', 1, 2, 300, 7, NULL, 'e', 300, 5, 'ok', 1.0);
"""
"""A journal as evalsyncd 0.1 (schema 1) wrote it, for root ``/r``: one row,
``d``/``a.jsonl`` acknowledged to 300 bytes."""


def write_schema_1_journal(db: Path) -> None:
    """Create ``db`` as a schema-1 journal (:data:`SCHEMA_1_JOURNAL`)."""
    con = sqlite3.connect(db)
    try:
        con.executescript(SCHEMA_1_JOURNAL)
        con.commit()
    finally:
        con.close()


def old_layout(
    raw: Any,
    prefix: str,
    path: str,
    main: bytes,
    chain: list[bytes],
    bucket: str = "evalsyncd-test",
) -> list[str]:
    """Lay ``path`` out as evalsyncd versions with append segments did: the main object
    with an epoch in its metadata, then one segment per ``chain`` item after it, plus a
    stale segment (inside the main object) and one of another epoch. Returns the
    segment keys."""
    epoch, other = "0123456789abcdef", "fedcba9876543210"
    raw.put_object(
        Bucket=bucket,
        Key=f"{prefix}/{path}",
        Body=main,
        Metadata={"evalsyncd-epoch": epoch},
    )
    base = f"{prefix}/.evalsyncd/seg/{path}/"
    keys = []
    start = len(main)
    for piece in chain:
        keys.append(f"{base}@{epoch}/{start:020d}")
        raw.put_object(Bucket=bucket, Key=keys[-1], Body=piece)
        start += len(piece)
    keys.append(f"{base}@{epoch}/{0:020d}")  # stale: already inside the main object
    raw.put_object(Bucket=bucket, Key=keys[-1], Body=main[:3])
    keys.append(f"{base}@{other}/{len(main):020d}")  # another epoch: never read
    raw.put_object(Bucket=bucket, Key=keys[-1], Body=b"garbage\n")
    return keys
