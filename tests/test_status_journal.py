"""``evalsyncd status`` on a journal the daemon refuses: one clear line and exit 78, never
"healthy"; the read-only open checks what the daemon's open checks, without writing."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from evalsyncd.cli import EX_CONFIG
from evalsyncd.config import load_settings
from evalsyncd.status import collect_status
from evalsyncd.sync.journal import Journal, JournalError
from evalsyncd.sync.lines import new_entry
from tests.helpers import write_schema_1_journal
from tests.opshelpers import evalsyncd, write_config

JOURNAL = "journal.sqlite3"


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "runs/r/b").mkdir(parents=True)
    (root / "runs/r/b/trajectories.jsonl").write_bytes(b'{"i": 1}\n')
    (root / "runs/r/metadata.json").write_bytes(b"{}")
    return root


@pytest.fixture
def synced(tmp_path: Path) -> tuple[Path, Path]:
    """A root mirrored once to a local directory: (config, journal file)."""
    config = write_config(
        tmp_path / "c.toml",
        _root(tmp_path),
        tmp_path / "state",
        [{"name": "m", "url": (tmp_path / "m").as_uri()}],
    )
    done = evalsyncd("sync", "--once", "--config", str(config))
    assert done.returncode == 0, done.stderr[-2000:]
    journal = tmp_path / "state" / JOURNAL
    assert journal.exists() and not Path(f"{journal}-wal").exists()  # checkpointed on close
    return config, journal


def _execute(sql: str) -> Callable[[Path], None]:
    def damage(journal: Path) -> None:
        con = sqlite3.connect(journal)
        con.execute(sql)
        con.commit()
        con.close()

    return damage


def _random_bytes(journal: Path) -> None:
    journal.write_bytes(os.urandom(journal.stat().st_size))


def _overwrite_meta_page(journal: Path) -> None:
    con = sqlite3.connect(journal)
    (page_size,) = con.execute("PRAGMA page_size").fetchone()
    (root_page,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'meta'").fetchone()
    con.close()
    with journal.open("r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(b"\xa5" * page_size)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "random bytes": (_random_bytes, "file is not a database"),
    "entries dropped": (_execute("DROP TABLE entries"), "no table entries"),
    "meta dropped": (_execute("DROP TABLE meta"), "no table meta"),
    "meta page damaged": (_overwrite_meta_page, "malformed"),
    "schema 999": (
        _execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'"),
        "journal schema 999, this evalsyncd knows 3",
    ),
    "another root": (
        _execute("UPDATE meta SET value = '/elsewhere' WHERE key = 'root'"),
        "belongs to root /elsewhere",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_status_on_a_damaged_journal_is_one_line_and_exit_78(
    synced: tuple[Path, Path], case: str
) -> None:
    """Each damage makes status (text and JSON) print one line naming the journal and
    the problem, exit 78 like sync's journal errors, print nothing on stdout, and never
    a traceback; collect_status raises JournalError."""
    config, journal = synced
    damage, problem = DAMAGE[case]
    damage(journal)
    with pytest.raises(JournalError, match=problem):
        collect_status(load_settings(config))
    for extra in ([], ["--json"]):
        out = evalsyncd("status", *extra, "--config", str(config))
        assert out.returncode == EX_CONFIG, out.stderr
        assert out.stdout == ""
        (line,) = out.stderr.splitlines()
        assert line.startswith(f"evalsyncd: {journal}: ") and problem in line, line


@pytest.mark.parametrize("case", ["random bytes", "schema 999", "another root"])
def test_status_and_sync_refuse_the_same_journals(synced: tuple[Path, Path], case: str) -> None:
    """A journal sync refuses (exit 78) is one status refuses too, with the same reason."""
    config, journal = synced
    damage, problem = DAMAGE[case]
    damage(journal)
    status = evalsyncd("status", "--config", str(config))
    sync = evalsyncd("sync", "--once", "--config", str(config))
    assert status.returncode == sync.returncode == EX_CONFIG
    assert problem in status.stderr and problem in sync.stderr


def test_readonly_open_refuses_a_schema_1_journal_until_the_daemon_upgrades_it(
    tmp_path: Path,
) -> None:
    """A version-1 journal read-only says to start the daemon once (and stays version 1);
    after the daemon's open upgrades it, the read-only open reads it."""
    db = tmp_path / JOURNAL
    write_schema_1_journal(db)
    with pytest.raises(JournalError, match=r"schema 1.*start the daemon once"):
        Journal(db, Path("/r"), readonly=True)
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
    con.close()
    Journal(db, Path("/r")).close()
    with Journal(db, Path("/r"), readonly=True) as j:
        entry = j.get("d", "a.jsonl")
        assert entry is not None and entry.tail_offset == 300


def test_a_new_journal_is_complete_for_readers_and_read_only_reads_it(tmp_path: Path) -> None:
    """The daemon's first open creates every table and the schema version at once; a
    read-only open (with or without the root) then reads the rows it acknowledged."""
    db, root = tmp_path / JOURNAL, tmp_path / "root"
    with Journal(db, root) as j:
        j.ack(new_entry("d", "a.jsonl", os.stat(tmp_path), acked_offset=5))
    con = sqlite3.connect(db)
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    con.close()
    assert meta["schema_version"] == "3" and meta["root"] == str(root)
    for reader_root in (root, None):
        with Journal(db, reader_root, readonly=True) as j:
            assert set(j.entries("d")) == {"a.jsonl"} and j.destinations() == {}


def test_reads_of_a_journal_damaged_after_opening_raise_journal_error(tmp_path: Path) -> None:
    """A read that hits a damaged page raises JournalError naming the file, not a raw
    sqlite3 error."""
    db = tmp_path / JOURNAL
    with Journal(db, tmp_path) as j:
        for i in range(200):  # enough rows for the entries table to span pages
            j.ack(new_entry("d", f"runs/r{i}/t.jsonl", os.stat(tmp_path), acked_offset=i))
    con = sqlite3.connect(db)
    (page_size,) = con.execute("PRAGMA page_size").fetchone()
    (root_page,) = con.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'entries'"
    ).fetchone()
    con.close()
    with Journal(db, tmp_path, readonly=True) as reader:
        with db.open("r+b") as f:
            f.seek((root_page - 1) * page_size)
            f.write(b"\xa5" * page_size)
        with pytest.raises(JournalError, match=rf"{JOURNAL}: cannot read the journal"):
            reader.entries("d")
