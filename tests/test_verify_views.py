"""`evalsyncd verify` checks both views: what evalsyncd's readers see (main object + tail)
and the plain objects every other tool reads (``evalsyncd/verify.py``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.store import EvalStore, StoredTrajectory
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.verify import DUE_GRACE_S, FileCheck, _check_plain
from tests.helpers import wait_for
from tests.reliability import RelEnv


def _verify(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evalsyncd", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_tampered_plain_object_fails_verify_while_the_tail_holds_the_bytes(
    rel: RelEnv, kind: str
) -> None:
    """Main objects held back (max_main_lag_s 600): verify says OK, with the plain objects
    noted as not yet up to date; after `{"tampered": true}` overwrites the plain
    runs.jsonl, the readers' view is still right but verify exits 1 naming the key."""
    reader = rel.add(kind, max_main_lag_s=600.0, compact_idle_s=600.0)
    assert isinstance(reader, S3Storage | GCSStorage)
    reader.tail_refresh_s = 0.0
    store = EvalStore(str(rel.root))
    run_id = store.create_run("m", ["b"], checkpoint_name="step1")
    for i in range(3):
        store.write_trajectory(run_id, "b", StoredTrajectory(idx=i, benchmark="b", reward=1.0))
    local = (rel.root / "runs.jsonl").read_bytes()
    with rel.daemon():
        wait_for(lambda: reader.exists("runs.jsonl") and reader.read("runs.jsonl") == local, 30)
        config = rel.tmp / "config.toml"
        before = _verify(config)
        assert before.returncode == 0, before.stdout + before.stderr
        assert "plain objects not yet up to date" in before.stdout
        assert "info" in before.stderr and "runs.jsonl (plain object)" in before.stderr
        reader.write("runs.jsonl", b'{"tampered": true}\n')  # the main object alone
        assert reader.read("runs.jsonl") == local  # evalsyncd's readers: still right
        after = _verify(config)
    assert after.returncode == 1, after.stdout + after.stderr
    line = next(x for x in after.stdout.splitlines() if x.startswith("MISMATCH"))
    assert "runs.jsonl (plain object): content:" in line and "never had" in line
    assert "1 MISMATCHES" in after.stdout


class _Plain:
    """Just enough of a backend for :func:`_check_plain`: one plain object."""

    supports_tail = True
    read_tail = False

    def __init__(self, data: bytes | None, version: str = "v1", mtime: float = 0.0) -> None:
        self.data, self.version, self.mtime = data, version, mtime

    async def astat(self, path: str) -> object:
        from evalsyncd.storage import StorageStat

        if self.data is None:
            return None
        return StorageStat(len(self.data), self.mtime, self.version)

    async def achecksum(self, path: str) -> None:
        return None

    async def aread_range(self, path: str, offset: int, length: int | None = None) -> bytes:
        assert self.data is not None
        end = len(self.data) if length is None else offset + length
        return self.data[offset:end]


LOCAL = b'{"a": 1}\n{"a": 2}\n'
NOW = 1_000_000.0


def _row(acked: int, tail_since: float | None, version: str | None = "v1") -> Entry:
    return Entry(
        destination="d",
        path="f.jsonl",
        dev=0,
        ino=0,
        acked_offset=acked,
        fingerprint=None,
        content_crc=None,
        remote_version=version,
        seen_size=0,
        seen_mtime_ns=0,
        status=EntryStatus.OK,
        acked_at=0.0,
        tail_offset=len(LOCAL),
        tail_since=tail_since,
    )


@pytest.mark.parametrize(
    ("plain", "row", "ok", "note"),
    [
        (LOCAL, None, True, ""),  # equal
        (LOCAL[:9], _row(9, NOW - 5), True, "behind"),  # a whole line behind, not due yet
        (LOCAL[:9], _row(9, NOW - 600), False, ""),  # ... past its due time
        (LOCAL[:9], None, True, "behind"),  # no journal row: cannot tell how long
        (LOCAL[:5], _row(0, NOW - 5), False, ""),  # ends inside a line
        (b'{"tampered": true}\n', _row(9, NOW - 5), False, ""),  # bytes the file never had
        (None, _row(0, NOW - 5), True, "not written yet"),  # a new file, all in the tail
        (None, _row(9, None), False, ""),  # the journal says 9 bytes were written there
        # replaced since (rewritten from 0): an earlier whole version, older than the tail
        (b'{"old": 0}\n', _row(0, NOW - 5, None), True, "earlier version"),
        (b'{"old": 0}\n' * 9, _row(0, NOW - 5, None), True, "earlier version"),
    ],
)
def test_plain_object_table(plain: bytes | None, row: Entry | None, ok: bool, note: str) -> None:
    """The plain object's verdicts (see the verify module docstring), over one JSONL file."""
    import asyncio
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "f.jsonl").write_bytes(LOCAL)
        readers = FileCheck("f.jsonl", True, "", len(LOCAL), len(LOCAL), "download")
        mtime = (row.tail_since or NOW) - 10 if row is not None else NOW
        check = asyncio.run(
            _check_plain(
                _Plain(plain, mtime=mtime),  # type: ignore[arg-type]
                root,
                "f.jsonl",
                readers,
                row,
                60.0 + DUE_GRACE_S,
                NOW,
            )
        )
    assert check.view == "plain"
    assert check.ok is ok, check
    assert note in check.note
    if not ok:
        assert check.detail


def test_a_tampered_earlier_version_is_a_mismatch(tmp_path: Path) -> None:
    """A rewritten file's old plain object is fine only if last written before the tail got
    the new bytes: one modified after that is a mismatch."""
    import asyncio

    (tmp_path / "f.jsonl").write_bytes(LOCAL)
    readers = FileCheck("f.jsonl", True, "", len(LOCAL), len(LOCAL), "download")
    row = _row(0, time.time() - 5, None)
    tampered = _Plain(b'{"old": 0}\n', mtime=time.time())
    check = asyncio.run(
        _check_plain(tampered, tmp_path, "f.jsonl", readers, row, 90.0, time.time())  # type: ignore[arg-type]
    )
    assert not check.ok and check.problem == "content"


@pytest.mark.parametrize(
    ("version", "ok"),
    [("v-daemon", True), ("v-someone-else", False)],
    ids=["the daemon's earlier version", "another writer's"],
)
def test_a_replaced_json_plain_object_is_fine_only_at_the_daemons_version(
    tmp_path: Path, version: str, ok: bool
) -> None:
    """A replace-on-write file whose new content is still in the tail: its plain object may
    be the version the journal says the daemon last wrote there, and nothing else."""
    import asyncio
    from dataclasses import replace

    (tmp_path / "m.json").write_bytes(b'{"new": 1}')
    readers = FileCheck("m.json", True, "", 10, 10, "download")
    row = replace(_row(9, NOW - 5, "v-daemon"), path="m.json")
    plain = _Plain(b'{"old": 0}', version=version, mtime=NOW - 100)
    check = asyncio.run(
        _check_plain(plain, tmp_path, "m.json", readers, row, 90.0, NOW)  # type: ignore[arg-type]
    )
    assert check.ok is ok, check
    assert ("earlier version" in check.note) if ok else check.problem == "content"
