"""The service's backlog and ``evalsyncd status`` count the same bytes; public names are listed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from evalsyncd.config import load_settings
from evalsyncd.status import collect_status
from evalsyncd.sync.files import FileKind
from evalsyncd.sync.lines import new_entry
from evalsyncd.sync.service import Service, unacked_bytes


def test_unacked_bytes_counts_complete_lines_past_the_acknowledged_offset(tmp_path: Path) -> None:
    """Append-only: complete lines after the journal's offset (from 0 once the file is
    replaced); replace-on-write: the whole size."""
    f = tmp_path / "t.jsonl"
    f.write_bytes(b"aa\nbbb\ncc")  # 9 bytes, the last line partial
    st = os.stat(f)
    assert unacked_bytes(f, FileKind.APPEND, st, None) == 7
    acked = new_entry("d", "t.jsonl", st, acked_offset=3)
    assert unacked_bytes(f, FileKind.APPEND, st, acked) == 4
    other_inode = new_entry("d", "t.jsonl", os.stat(tmp_path), acked_offset=3)
    assert unacked_bytes(f, FileKind.APPEND, st, other_inode) == 7
    assert unacked_bytes(f, FileKind.REPLACE, st, acked) == 9


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
