"""The service's backlog and ``evalsyncd status`` count the same bytes (a file rewritten in
place whole); a state_dir without room for a journal is named."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import crc32c
import pytest

from evalsyncd.cli import EX_CONFIG
from evalsyncd.config import load_settings
from evalsyncd.errors import ConfigError
from evalsyncd.status import collect_status
from evalsyncd.sync.files import FileKind
from evalsyncd.sync.lines import divergence, fingerprint_at, new_entry
from evalsyncd.sync.service import Service, unacked_bytes
from tests.opshelpers import evalsyncd, write_config


def test_unacked_bytes_counts_complete_lines_past_the_acknowledged_offset(tmp_path: Path) -> None:
    """Append-only: complete lines after the journal's offset (from 0 once the file is
    replaced); replace-on-write: the whole size."""
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"aa\nbbb\ncc")  # 9 bytes, the last line partial
    st = os.stat(f)
    assert unacked_bytes(f, FileKind.APPEND, st, None) == 7
    acked = new_entry("d", "t.jsonl", st, acked_offset=3, fingerprint=crc32c.crc32c(b"aa\n"))
    assert unacked_bytes(f, FileKind.APPEND, st, acked) == 4
    other_inode = new_entry("d", "t.jsonl", os.stat(tmp_path), acked_offset=3)
    assert unacked_bytes(f, FileKind.APPEND, st, other_inode) == 7
    assert unacked_bytes(f, FileKind.REPLACE, st, acked) == 9


def test_unacked_bytes_counts_a_file_rewritten_in_place_whole(tmp_path: Path) -> None:
    """A file rewritten in place (same inode, bigger, other bytes before the acknowledged
    offset) counts all its complete lines, as the daemon re-sends it; the count starts
    from 0 exactly when divergence, the daemon's check, says why."""
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"i": 1}\n{"i": 2}\n')
    st = os.stat(f)
    fd = os.open(f, os.O_RDONLY)
    try:
        acked = new_entry(
            "d", "t.jsonl", st, acked_offset=st.st_size, fingerprint=fingerprint_at(fd, st.st_size)
        )
    finally:
        os.close(fd)
    with f.open("ab") as out:
        out.write(b'{"i": 3}\n')
    appended = os.stat(f)
    assert unacked_bytes(f, FileKind.APPEND, appended, acked) == len(b'{"i": 3}\n')
    with f.open("r+b") as out:  # in place: same inode
        out.write(b'{"j": 1}\n{"j": 2}\n{"j": 3}\n{"j": 4}\n')
    rewritten = os.stat(f)
    assert (rewritten.st_dev, rewritten.st_ino) == (st.st_dev, st.st_ino)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert divergence(fd, rewritten, acked) == "rewritten (fingerprint mismatch)"
    finally:
        os.close(fd)
    assert unacked_bytes(f, FileKind.APPEND, rewritten, acked) == rewritten.st_size == 36


def test_status_counts_a_file_rewritten_in_place_whole(tmp_path: Path) -> None:
    """After a sync, a trajectories file rewritten in place (same inode, bigger) is
    pending whole in collect_status, and Service.backlog says the same."""
    root = tmp_path / "root"
    (root / "runs/r/b").mkdir(parents=True)
    traj = root / "runs/r/b/trajectories.jsonl"
    traj.write_bytes(b'{"i": 1}\n{"i": 2}\n')
    settings = load_settings(
        root=root,
        state_dir=tmp_path / "state",
        destinations=[{"name": "m", "url": (tmp_path / "m").as_uri()}],
    )

    async def sync_then_backlog(rewrite: bool) -> int:
        service = Service(settings)
        await service.open()
        try:
            if not rewrite:
                assert await service.sync_once(timeout_s=30.0)
                return 0
            await service.rescan()
            return service.backlog("m").bytes
        finally:
            await service.close()

    asyncio.run(sync_then_backlog(rewrite=False))
    ino = traj.stat().st_ino
    with traj.open("r+b") as out:
        out.write(b'{"j": 1}\n{"j": 2}\n{"j": 3}\n')
    assert traj.stat().st_ino == ino
    (status,) = collect_status(settings).destinations
    assert status.pending_files == 1 and status.pending_bytes == traj.stat().st_size == 27
    assert asyncio.run(sync_then_backlog(rewrite=True)) == 27


def test_service_backlog_agrees_with_status(tmp_path: Path) -> None:
    """After a scan, Service.backlog and collect_status report the same pending bytes
    (a partial last line is counted by neither)."""
    root = tmp_path / "root"
    (root / "runs/r/b").mkdir(parents=True)
    (root / "runs/r/b/trajectories.jsonl").write_bytes(b'{"i": 1}\n{"i": 2}\n{"i": 3')
    (root / "runs/r/metadata.json").write_bytes(b"{}")
    settings = load_settings(
        root=root,
        state_dir=tmp_path / "state",
        destinations=[{"name": "m", "url": (tmp_path / "m").as_uri()}],
    )

    async def backlog_bytes() -> int:
        service = Service(settings)
        await service.open()
        try:
            await service.rescan()
            return service.backlog("m").bytes
        finally:
            await service.close()

    ours = asyncio.run(backlog_bytes())
    (status,) = collect_status(settings).destinations
    assert ours == status.pending_bytes == len(b'{"i": 1}\n{"i": 2}\n') + 2


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs at /sys")
def test_a_state_dir_where_no_journal_can_be_created_is_named(tmp_path: Path) -> None:
    """state_dir = /sys (exists, no journal can be created in it): Service.open raises a
    ConfigError naming state_dir, and sync exits 78 with that message."""
    root = tmp_path / "root"
    root.mkdir()
    settings = load_settings(
        root=root,
        state_dir=Path("/sys"),
        destinations=[{"name": "m", "url": (tmp_path / "m").as_uri()}],
    )

    async def open_service() -> None:
        service = Service(settings)
        try:
            await service.open()
        finally:
            await service.close()

    with pytest.raises(ConfigError, match=r"^state_dir: .*/sys"):
        asyncio.run(open_service())
    config = write_config(
        tmp_path / "c.toml", root, Path("/sys"), [{"name": "m", "url": (tmp_path / "m").as_uri()}]
    )
    out = evalsyncd("sync", "--once", "--config", str(config))
    assert out.returncode == EX_CONFIG
    assert "state_dir: " in out.stderr and "/sys" in out.stderr and "Traceback" not in out.stderr
