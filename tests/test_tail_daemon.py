"""The daemon through the tail log: one request per flush, readers stitched, main objects later.

Subprocess daemons against SeaweedFS and fake-gcs-server; requests are counted by a
proxy between the daemon and the server (``evalsyncd.testing.proxy.CountingProxy``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.config import DestinationSettings, RetrySettings
from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage.tail import read_index
from evalsyncd.sync.destination import Destination, DestinationState
from evalsyncd.sync.journal import Journal
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server
from tests.conftest import S3_BUCKET
from tests.daemon import write_config
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import wait_for, write_schema_1_journal
from tests.reliability import RelEnv, events, list_keys, s3_main_object, wait_settled


def _append(path: Path, i: int) -> None:
    with open(path, "ab") as f:
        f.write(json.dumps({"n": i, "pad": "x" * 200}).encode() + b"\n")


def _server_port(kind: str, s3: SeaweedS3Server, gcs: FakeGCSServer) -> int:
    return s3.port if kind == "s3" else gcs.port


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_flush_of_many_files_is_one_request(
    rel: RelEnv, kind: str, s3_server: SeaweedS3Server, gcs_server: FakeGCSServer
) -> None:
    """40 growing files cost about one request per flush, not one per file."""
    files = [rel.root / f"runs/r{i}/b/trajectories.jsonl" for i in range(40)]
    for f in files:
        f.parent.mkdir(parents=True)
    with CountingProxy("127.0.0.1", _server_port(kind, s3_server, gcs_server)) as proxy:
        reader = rel.add(kind, endpoint_url=proxy.url, compact_idle_s=600.0)
        assert isinstance(reader, S3Storage | GCSStorage)
        reader.tail_refresh_s = 0.0
        with rel.daemon(flush_interval_s=0.5, log_level="debug") as daemon:
            for f in files:
                _append(f, 0)
            wait_for(lambda: all(reader.exists(str(f.relative_to(rel.root))) for f in files), 30)
            proxy.reset()
            flushes_before = len(events(daemon, "tail_written"))
            started = time.monotonic()
            for step in range(1, 9):
                for f in files:
                    _append(f, step)
                time.sleep(0.25)  # paces the simulated writers: 8 rounds in 2 s
            last = str(files[-1].relative_to(rel.root))
            wait_for(lambda: reader.read(last).count(b"\n") == 9, 30)
            elapsed = time.monotonic() - started
            requests = proxy.requests
            flushes = len(events(daemon, "tail_written")) - flushes_before
    # one tail object per flush; nothing per file (no main object is due: quiet 600 s)
    assert flushes <= elapsed / 0.5 + 2
    assert requests <= flushes + 2, f"{requests} requests for {flushes} flushes of 40 files"


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_readers_see_the_tail_and_main_objects_catch_up(rel: RelEnv, kind: str) -> None:
    """evalsyncd readers see new lines at once; main objects catch up on idle; tail objects go."""
    reader = rel.add(kind, compact_idle_s=1.0)
    assert isinstance(reader, S3Storage | GCSStorage)
    reader.tail_refresh_s = 0.0
    path = rel.root / "runs/r/b/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    key = "runs/r/b/trajectories.jsonl"
    (rel.root / "runs/r/metadata.json").write_text('{"run_id": "r"}')
    with rel.daemon(flush_interval_s=0.2, log_level="debug") as daemon:
        for i in range(20):
            _append(path, i)
        wait_for(lambda: reader.exists(key) and reader.read(key) == path.read_bytes(), 30)
        # the main objects follow once the files are quiet
        wait_settled(rel, timeout_s=60)
        wait_for(lambda: not asyncio.run(_pending(reader)), 30, what="tail index empty")
        assert events(daemon, "main_due")
        # only the newest tail object is left
        wait_for(lambda: len(list_keys(reader, internal=True)) <= 3, 30)
    if kind == "s3":
        assert s3_main_object(reader, key) == path.read_bytes()
    tail = [k for k in list_keys(reader, internal=True) if k.startswith(".evalsyncd/tail/")]
    assert len(tail) == 1


async def _pending(reader: S3Storage | GCSStorage) -> dict[str, object]:
    try:
        return dict((await read_index(reader)).files)
    finally:
        await reader.aclose()


def test_main_objects_are_exact_after_a_clean_stop(rel: RelEnv) -> None:
    """SIGTERM brings every main object up to date before the daemon exits 0."""
    reader = rel.add("s3", compact_idle_s=600.0)
    assert isinstance(reader, S3Storage)
    path = rel.root / "runs/r/b/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    daemon = rel.daemon(flush_interval_s=0.2)
    with daemon:
        for i in range(5):
            _append(path, i)
        key = "runs/r/b/trajectories.jsonl"
        wait_for(lambda: reader.exists(key) and reader.read(key) == path.read_bytes(), 30)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert s3_main_object(reader, "runs/r/b/trajectories.jsonl") == path.read_bytes()


def test_max_main_lag_zero_keeps_every_main_object_exact(rel: RelEnv) -> None:
    """With max_main_lag_s = 0 no tail object is written: the per-file path of the first design."""
    reader = rel.add("s3", max_main_lag_s=0.0)
    assert isinstance(reader, S3Storage)
    path = rel.root / "runs/r/b/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    with rel.daemon(flush_interval_s=0.1):
        for i in range(10):
            _append(path, i)
        key = "runs/r/b/trajectories.jsonl"
        wait_for(
            lambda: key in list_keys(reader) and s3_main_object(reader, key) == path.read_bytes(),
            30,
        )
    assert not [k for k in list_keys(reader, internal=True) if k.startswith(".evalsyncd/tail/")]


def test_a_second_daemon_on_the_same_prefix_is_detected(rel: RelEnv, tmp_path: Path) -> None:
    """Two daemons with their own journals on one prefix: one parks with a clear error."""
    reader = rel.add("s3")
    other_root = tmp_path / "other-root"
    (other_root / "runs/x").mkdir(parents=True)
    (rel.root / "runs/y").mkdir(parents=True)
    other_cfg = write_config(
        tmp_path / "other.toml",
        other_root,
        tmp_path / "other-state",
        rel.dests,
        flush_interval_s=0.1,
    )
    from tests.daemon import Daemon

    with rel.daemon() as a, Daemon(other_cfg, tmp_path / "other.log") as b:
        lines = iter(range(10_000))

        def one_parked() -> bool:
            i = next(lines)  # both daemons keep writing tail objects meanwhile
            _append(rel.root / "runs/y/t.jsonl", i)
            _append(other_root / "runs/x/t.jsonl", i)
            return any(
                e.get("new") == "parked" and "another evalsyncd" in (e.get("reason") or "")
                for d in (a, b)
                for e in events(d, "destination_state")
            )

        wait_for(one_parked, 30, 0.1, "one daemon parked by the other")
    assert isinstance(reader, S3Storage)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_main_lag_s", -1, "max_main_lag_s"),
        ("tail_max_pieces", 0, "tail_max_pieces"),
        ("max_upload_bytes_per_s", 0, "max_upload_bytes_per_s"),
        ("direct_append_bytes", "lots", "direct_append_bytes"),
    ],
)
def test_bad_tail_settings_exit_78_naming_the_key(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    """A bad value of a new destination setting is a configuration error (exit 78) naming it."""
    root = tmp_path / "root"
    root.mkdir()
    dest = {"name": "d", "url": (tmp_path / "m").as_uri(), key: value}
    cfg = write_config(tmp_path / "c.toml", root, tmp_path / "state", [dest])
    proc = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "sync", "--once", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EVALSYNCD_LOG_FORMAT": "console"},
    )
    assert proc.returncode == 78, proc.stderr
    assert f"destinations.0.{message}" in proc.stderr


def test_journal_of_schema_1_is_upgraded(tmp_path: Path) -> None:
    """A version 1 journal opens as version 2 with tail_offset = acked_offset."""

    db = tmp_path / "journal.sqlite3"
    write_schema_1_journal(db)
    with Journal(db, Path("/r")) as j:
        entry = j.get("d", "a.jsonl")
        assert entry is not None
        assert (entry.acked_offset, entry.tail_offset, entry.tail_since) == (300, 300, None)
        writer = j.writer_id()
    with Journal(db, Path("/r")) as j:
        assert j.writer_id() == writer


def test_bandwidth_limit_paces_uploads() -> None:
    """max_upload_bytes_per_s: sending 3x the per-second budget takes about 2 s or more."""
    from evalsyncd.config import DestinationSettings
    from evalsyncd.storage import LocalStorage
    from evalsyncd.sync.destination import Destination

    async def scenario(tmp: Path) -> float:
        settings = DestinationSettings(name="d", url=tmp.as_uri(), max_upload_bytes_per_s=100_000)
        with Journal(tmp / "j.sqlite3", tmp) as journal:
            d = Destination(settings, LocalStorage(tmp / "m"), journal, tmp, flush_interval_s=1.0)
            started = time.monotonic()
            for _ in range(3):
                await d.throttle(100_000)
            await d.throttle(100_000)
            return time.monotonic() - started

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        assert asyncio.run(scenario(Path(tmp))) >= 2.5


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_restart_after_a_tail_write_that_was_never_journaled(rel: RelEnv, kind: str) -> None:
    """A tail object written just before a crash (its journal commit lost) is reconciled:
    the file is staged again from its main object's offset, no line lost or doubled."""
    reader = rel.add(kind, compact_idle_s=600.0)
    assert isinstance(reader, S3Storage | GCSStorage)
    path = rel.root / "runs/r/b/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    key = "runs/r/b/trajectories.jsonl"
    for i in range(3):
        _append(path, i)
    daemon = rel.daemon(flush_interval_s=0.2)
    with daemon:
        wait_for(lambda: reader.exists(key) and reader.read(key) == path.read_bytes(), 30)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    assert key in list_keys(reader)  # the clean stop wrote the main object
    # the crash: more lines reached a tail object, the journal never heard of it
    synced = path.stat().st_size
    for i in range(3, 6):
        _append(path, i)
    with Journal(rel.state / "journal.sqlite3", rel.root) as journal:
        writer_id = journal.writer_id()

    async def crash_write() -> None:
        writer = reader.tail_writer(writer_id)
        await writer.open()
        data = path.read_bytes()[synced:]
        writer.stage_append(key, synced, data, base=synced, main_version=None, mtime=1.0)
        await writer.commit()
        await reader.aclose()

    asyncio.run(crash_write())
    with rel.daemon(flush_interval_s=0.2, log_level="debug") as daemon:
        wait_for(lambda: events(daemon, "tail_reconciled"), 30)
        wait_for(lambda: reader.read(key) == path.read_bytes(), 30)
    lines = [json.loads(x)["n"] for x in reader.read(key).splitlines()]
    assert lines == list(range(6))
    if kind == "s3":
        assert s3_main_object(reader, key) == path.read_bytes()  # the clean stop caught up


class _TailSizeRecorder(S3Storage):
    """An S3 storage that records the size of every tail object it tries to create."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tail_sizes: list[int] = []

    async def _tail_create(self, name: str, data: bytes) -> None:
        self.tail_sizes.append(len(data))
        await super()._tail_create(name, data)


def test_a_retry_after_a_failure_sends_one_retry_chunk_not_the_backlog(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """A tail object holds at most one chunk of all files together; while the destination
    fails, each retry holds at most one retry chunk, so memory does not grow with the
    backlog; the first success brings full chunks back, and every byte arrives."""
    chunk, retry_chunk, slack = 512 * 1024, 64 * 1024, 8 * 1024  # slack: header, one line
    root = tmp_path / "root"
    keys = [f"runs/r{i}/b/trajectories.jsonl" for i in range(3)]
    for key in keys:
        (root / key).parent.mkdir(parents=True)
        for n in range(1000):  # about 215 KB a file: 645 KB behind, more than one chunk
            _append(root / key, n)
    settings = DestinationSettings(
        name="s3",
        url=f"s3://{S3_BUCKET}/{unique_prefix}",
        compact_idle_s=600.0,
        direct_append_bytes=2**30,  # every byte through the tail log
        retry=RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.05),
    )

    async def scenario(proxy: FaultProxy) -> list[int]:
        storage = _TailSizeRecorder(
            S3_BUCKET, unique_prefix, endpoint_url=proxy.url, max_attempts=1
        )
        async with storage:
            with Journal(tmp_path / "j.sqlite3", root) as journal:
                d = Destination(
                    settings,
                    storage,
                    journal,
                    root,
                    flush_interval_s=0.01,
                    chunk_bytes=chunk,
                    retry_chunk_bytes=retry_chunk,
                )
                for key in keys:
                    d.mark(key)
                assert not await d.run_pass()  # SlowDown: BACKOFF
                assert d.state is DestinationState.BACKOFF and d.chunk_bytes == retry_chunk
                assert not await d.run_pass()
                assert await d.run_pass()  # the server is back
                assert d.chunk_bytes == chunk
                for _ in range(30):
                    if d.is_idle():
                        break
                    assert await d.run_pass()
                assert d.is_idle()
        return storage.tail_sizes

    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.add(Rule(action="slowdown", method="PUT", path_contains="/.evalsyncd/tail/", times=2))
        sizes = asyncio.run(scenario(proxy))
    assert proxy.fired("slowdown") == 2
    assert chunk - slack < sizes[0] <= chunk + slack  # the first attempt: a whole chunk
    assert all(size <= retry_chunk + slack for size in sizes[1:3])  # the retries, and the success
    assert chunk - slack < sizes[3] <= chunk + slack  # healthy again: whole chunks
    assert all(size <= chunk + slack for size in sizes)
    reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
    try:
        for key in keys:
            assert reader.read(key) == (root / key).read_bytes()
    finally:
        reader.close()
