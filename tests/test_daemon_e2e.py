"""The daemon end to end: a real ``evalsyncd run`` subprocess, real S3 and GCS servers."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.storage import AnyStorage, GCSStorage, LocalStorage, S3Storage
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.daemon import (
    Daemon,
    expected_mirror,
    read_keys,
    remote_tree,
    wait_mirrored,
    write_config,
)
from tests.helpers import wait_for
from tests.opshelpers import evalsyncd

MiB = 1024 * 1024


class Env:
    """One test's root, state directory, destinations and their reader storages."""

    def __init__(self, tmp_path: Path, s3_endpoint: str, prefix: str) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.state = tmp_path / "state"
        self.prefix = prefix
        self.s3_endpoint = s3_endpoint
        self.readers: dict[str, AnyStorage] = {}
        self.dests: list[dict[str, Any]] = []

    def add(self, kind: str, **extra: Any) -> AnyStorage:
        name = extra.pop("name", kind)
        if kind == "s3":
            url = f"s3://{S3_BUCKET}/{self.prefix}/{name}"
            extra.setdefault("endpoint_url", self.s3_endpoint)
            reader: AnyStorage = S3Storage(
                S3_BUCKET, f"{self.prefix}/{name}", endpoint_url=self.s3_endpoint
            )
        elif kind == "gcs":
            url = f"gs://{GCS_BUCKET}/{self.prefix}/{name}"
            reader = GCSStorage(GCS_BUCKET, f"{self.prefix}/{name}")
        else:
            url = (self.tmp / f"mirror-{name}").as_uri()
            reader = LocalStorage(self.tmp / f"mirror-{name}")
        self.dests.append({"name": name, "url": url, **extra})
        self.readers[name] = reader
        return reader

    def daemon(self, **settings: Any) -> Daemon:
        cfg = write_config(self.tmp / "config.toml", self.root, self.state, self.dests, **settings)
        return Daemon(cfg, self.tmp / "daemon.log")

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


@pytest.fixture
def env(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> Iterator[Env]:
    e = Env(tmp_path, s3_server.endpoint_url, unique_prefix)
    yield e
    e.close()


def _trajectory(i: int, benchmark: str, size: int = 200) -> StoredTrajectory:
    return StoredTrajectory(
        idx=i,
        benchmark=benchmark,
        example_id=f"ex-{i}",
        turns=[
            StoredTurn(role="user", content="q" * size),
            StoredTurn(role="assistant", content="a"),
        ],
        reward=float(i % 2),
        metrics={"correct": float(i % 2)},
        time_seconds=0.5,
    )


def _write_runs(store: EvalStore, n_runs: int, n_traj: int) -> list[str]:
    run_ids = []
    for r in range(n_runs):
        run_id = store.create_run(
            "model-x", ["gsm8k", "math"], checkpoint_name=f"ckpt{r}", run_id=f"run-{r:03d}"
        )
        for bench in ("gsm8k", "math"):
            for i in range(n_traj):
                store.write_trajectory(run_id, bench, _trajectory(i, bench))
            store.write_result(
                run_id,
                BenchmarkResult(
                    name=bench,
                    score=0.5,
                    num_examples=n_traj,
                    num_correct=n_traj // 2,
                    pass_at_k={1: 0.5},
                ),
            )
        store.write_summary(run_id, {b: store.read_result(run_id, b) for b in ("gsm8k", "math")})  # type: ignore[misc]
        store.finalize_run(run_id)
        run_ids.append(run_id)
    return run_ids


def test_evalstore_runs_reach_every_destination_byte_identical(env: Env) -> None:
    """Runs written through EvalStore appear in S3, GCS and a local mirror, byte for byte."""
    readers = [env.add("s3"), env.add("gcs"), env.add("file")]
    store = EvalStore(env.root)
    with env.daemon():
        _write_runs(store, 3, 20)
        for reader in readers:
            wait_mirrored(env.root, reader)
        _write_runs(EvalStore(env.root), 1, 5)  # more after the first catch-up
        for reader in readers:
            mirror = wait_mirrored(env.root, reader)
            assert "runs/run-000/gsm8k/trajectories.jsonl" in mirror
    for reader in readers:
        remote = EvalStore(reader)
        assert [r.run_id for r in remote.list_runs()] == [r.run_id for r in store.list_runs()]
        assert remote.read_trajectories("run-001", "math") == store.read_trajectories(
            "run-001", "math"
        )


def test_partial_line_waits_for_its_newline(env: Env) -> None:
    """A JSONL line written in pieces is never mirrored half-way."""
    reader = env.add("gcs")
    path = env.root / "runs/r/b/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    marker = env.root / "runs/r/b/marker.jsonl"
    with env.daemon():
        with open(path, "ab") as f:
            f.write(b'{"line": 1}\n{"line": 2, "par')
            f.flush()
            wait_for(lambda: reader.exists("runs/r/b/trajectories.jsonl"), 30)
            for i, piece in enumerate((b't": "a', b"b", b'c"}')):
                f.write(piece)
                f.flush()
                # a later change of another file reaching the bucket proves the daemon
                # has passed over the partial line since it was written
                with open(marker, "ab") as m:
                    m.write(b'{"marker": %d}\n' % i)
                want = marker.read_bytes()
                wait_for(
                    lambda want=want: _read_or_none(reader, "runs/r/b/marker.jsonl") == want, 30
                )
                assert reader.read("runs/r/b/trajectories.jsonl") == b'{"line": 1}\n'
            f.write(b"\n")
        wait_mirrored(env.root, reader)


def _read_or_none(reader: AnyStorage, path: str) -> bytes | None:
    try:
        return reader.read(path)
    except FileNotFoundError:
        return None


def test_growing_file_past_5mib_costs_about_the_delta(env: Env, s3_server: SeaweedS3Server) -> None:
    """A trajectories file growing to 8 MiB costs ~2x its size on the wire to S3 and ~1x to GCS."""
    host, port = "127.0.0.1", s3_server.port
    gcs_port = int(os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
    with CountingProxy(host, port) as s3_proxy, CountingProxy(host, gcs_port) as gcs_proxy:
        s3 = env.add("s3", endpoint_url=s3_proxy.url)
        gcs = env.add("gcs", endpoint_url=gcs_proxy.url)
        path = env.root / "runs/r/b/trajectories.jsonl"
        path.parent.mkdir(parents=True)
        line = json.dumps({"turns": "x" * 4000}).encode() + b"\n"
        step = line * (MiB // len(line) // 2)  # ~0.5 MiB per step
        with env.daemon(flush_interval_s=0.1):
            for _ in range(16):
                with open(path, "ab") as f:
                    f.write(step)
                size = path.stat().st_size
                wait_for(
                    lambda s=size: all(
                        (st := r.stat("runs/r/b/trajectories.jsonl")) and st.size == s
                        for r in (s3, gcs)
                    ),
                    60,
                )
            wait_mirrored(env.root, s3)
            wait_mirrored(env.root, gcs)
            appended = path.stat().st_size
    s3_ratio = s3_proxy.total / appended
    gcs_ratio = gcs_proxy.total / appended
    print(
        f"appended {appended} B; S3 {s3_proxy.total} B ({s3_ratio:.2f}x); GCS {gcs_proxy.total} B ({gcs_ratio:.2f}x)"
    )
    assert s3_ratio <= 2.0
    assert gcs_ratio <= 1.1


def _writer(root: Path, stop: threading.Event, files: int, counter: list[int]) -> None:
    rng = random.Random(7)
    handles = []
    for i in range(files):
        p = root / f"runs/run-{i}/bench/trajectories.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        handles.append(p)
    n = 0
    while not stop.is_set():
        p = handles[rng.randrange(files)]
        record = json.dumps({"n": n, "pad": "p" * rng.randrange(10, 3000)}) + "\n"
        fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, record.encode())
        finally:
            os.close(fd)
        n += 1
        time.sleep(0.001)
    counter.append(n)


def _assert_lines_unique_and_complete(mirror: dict[str, bytes], total: int) -> None:
    seen: list[int] = []
    for data in mirror.values():
        seen.extend(json.loads(line)["n"] for line in data.splitlines())
    assert sorted(seen) == list(range(total)), "lost or duplicated lines"


def test_kill_9_during_uploads_loses_and_duplicates_nothing(env: Env) -> None:
    """SIGKILL at random moments while writers append, then restart: every line once."""
    readers = [env.add("s3"), env.add("gcs"), env.add("file")]
    stop, counter = threading.Event(), []
    writer = threading.Thread(target=_writer, args=(env.root, stop, 4, counter))
    writer.start()
    rng = random.Random(3)
    try:
        daemon = env.daemon(flush_interval_s=0.05)
        for _ in range(6):
            daemon.start()
            time.sleep(rng.uniform(0.3, 1.5))  # let it get into uploads, then crash it
            daemon.kill()
    finally:
        stop.set()
        writer.join()
    with daemon:
        for reader in readers:
            mirror = wait_mirrored(env.root, reader, timeout_s=120)
            _assert_lines_unique_and_complete(mirror, counter[0])


def test_outage_then_catch_up_without_restart(tmp_path: Path, env: Env) -> None:
    """A server stopped while writers write is caught up after it returns, same daemon."""
    server = SeaweedS3Server(tmp_path / "outage-s3").start()
    try:
        server.create_bucket(S3_BUCKET)
        env.s3_endpoint = server.endpoint_url
        s3 = env.add(
            "s3",
            retry={
                "initial_backoff_s": 0.1,
                "max_backoff_s": 1.0,
                "connect_timeout_s": 1.0,
                "read_timeout_s": 3.0,
            },
        )
        local = env.add("file")
        store = EvalStore(env.root)
        with env.daemon() as daemon:
            _write_runs(store, 1, 5)
            wait_mirrored(env.root, s3)
            server.stop()
            _write_runs(store, 2, 5)
            wait_mirrored(env.root, local)  # a down destination holds back no other
            wait_for(
                lambda: any(
                    e.get("event") == "destination_state" and e.get("new") == "backoff"
                    for e in daemon.log_events()
                ),
                30,
            )
            server.start(restart=True)
            wait_mirrored(env.root, s3, timeout_s=60)
            assert daemon.alive()
    finally:
        server.stop()


def test_truncation_and_replacement_are_remirrored(env: Env) -> None:
    """A truncated-and-rewritten file and a file replaced under its name are uploaded again."""
    readers = [env.add("s3"), env.add("gcs"), env.add("file")]
    path = env.root / "runs/r/b/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(b'{"old": %d}\n' % i for i in range(100)))
    with env.daemon():
        for r in readers:
            wait_mirrored(env.root, r)
        with open(path, "r+b") as f:  # truncate in place, then shorter new content
            f.truncate(0)
            f.write(b'{"new": 1}\n')
        for r in readers:
            wait_mirrored(env.root, r)
        tmp = path.with_name(".trajectories.jsonl.tmp")
        tmp.write_bytes(b'{"new": 1}\n' + b'{"replaced": 2}\n' * 50)
        os.replace(tmp, path)  # new inode, same name
        for r in readers:
            wait_mirrored(env.root, r)
        path.unlink()  # deleted, then recreated under the same name
        path.write_bytes(b'{"recreated": 3}\n')
        for r in readers:
            wait_mirrored(env.root, r)


def test_burst_of_2000_files_in_new_directories(env: Env) -> None:
    """2,000 files created at once in 200 brand-new directories are all mirrored."""
    readers = [env.add("gcs"), env.add("file")]
    with env.daemon():
        for d in range(200):
            run = env.root / f"runs/burst-{d:03d}"
            for b in range(10):
                p = run / f"b{b}" / "result.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps({"d": d, "b": b}))
        for r in readers:
            mirror = wait_mirrored(env.root, r, timeout_s=180)
            assert len(mirror) == 2000


def test_invalid_json_is_reported_not_uploaded(env: Env) -> None:
    """A .json that never parses is logged with its key and never uploaded; fixing it uploads it."""
    reader = env.add("file")
    bad = env.root / "runs/r/metadata.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"run_id": "r", ')
    (env.root / "runs/r/ok.json").write_text("{}")
    with env.daemon(invalid_json_grace_s=0.5) as daemon:
        wait_for(lambda: reader.exists("runs/r/ok.json"), 30)
        wait_for(
            lambda: any(
                e.get("event") == "invalid_json_not_uploaded"
                and e.get("key") == "runs/r/metadata.json"
                for e in daemon.log_events()
            ),
            30,
        )
        assert not reader.exists("runs/r/metadata.json")
        bad.write_text('{"run_id": "r"}')
        wait_mirrored(env.root, reader)


@pytest.mark.parametrize("mirror_deletes", [False, True])
def test_local_deletes_keep_or_mirror(env: Env, mirror_deletes: bool) -> None:
    """Deleted local files keep their objects unless mirror_deletes is on."""
    reader = env.add("gcs")
    f = env.root / "runs/r/b/result.json"
    f.parent.mkdir(parents=True)
    f.write_text("{}")
    with env.daemon(mirror_deletes=mirror_deletes) as daemon:
        wait_mirrored(env.root, reader)
        f.unlink()
        # The daemon's decision about the deleted file is logged either way.
        event = "delete_mirrored" if mirror_deletes else "local_file_deleted"
        wait_for(lambda: any(e.get("event") == event for e in daemon.log_events()), 30)
        assert reader.exists("runs/r/b/result.json") is not mirror_deletes


def test_a_run_moved_out_of_the_root_is_deleted_without_waiting_for_a_full_scan(
    env: Env, tmp_path: Path
) -> None:
    """A run directory moved out of the watched root (one inotify event, for the directory)
    has its files' objects deleted (mirror_deletes) long before the next full rescan; so
    has one replaced by a file of the same name (its files' paths now fail with ENOTDIR)."""
    reader = env.add("s3")
    store = EvalStore(env.root)
    _write_runs(store, 3, 3)

    def files_of(run: str) -> list[str]:
        top = env.root / "runs" / run
        return sorted(p.relative_to(env.root).as_posix() for p in top.rglob("*") if p.is_file())

    with env.daemon(mirror_deletes=True, rescan_interval_s=600.0) as daemon:
        wait_mirrored(env.root, reader)
        gone = files_of("run-001")
        assert gone and all(reader.exists(rel) for rel in gone)
        os.rename(env.root / "runs/run-001", tmp_path / "moved-away")
        wait_for(lambda: not any(reader.exists(rel) for rel in gone), 30, what="objects deleted")
        assert reader.exists("runs/run-000/metadata.json")
        assert any(e.get("event") == "delete_mirrored" for e in daemon.log_events())

        replaced = files_of("run-002")
        os.rename(env.root / "runs/run-002", tmp_path / "replaced")
        (env.root / "runs/run-002").write_text("not a run\n")
        wait_for(lambda: not any(reader.exists(r) for r in replaced), 30, what="replaced run")
        assert not any(e.get("event") == "file_unreadable" for e in daemon.log_events())
        assert reader.exists("runs/run-000/metadata.json")


@pytest.mark.parametrize("mirror_deletes", [False, True])
def test_a_run_directory_swapped_for_a_symlink_is_never_read_through_it(
    env: Env, tmp_path: Path, mirror_deletes: bool
) -> None:
    """A writer that swaps a mirrored run directory (or a benchmark directory in it) for a
    symlink to a directory outside the root, holding files of the same names (another
    user's secrets, the daemon's own configuration), must not get them uploaded: no
    symlink is followed on a file's path, so the run's files are seen as gone, as
    deleted files are, and the mirror never holds a byte from outside the root."""
    reader = env.add("s3")
    env.add("local", name="nfs")
    store = EvalStore(env.root)
    _write_runs(store, 3, 3)
    secret = tmp_path / "outside"
    for run in ("run-001", "run-002"):
        for rel in sorted(p for p in (env.root / "runs" / run).rglob("*") if p.is_file()):
            target = secret / run / rel.relative_to(env.root / "runs" / run)
            target.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"secret": "SECRET-" + "x" * 50}) + "\n"
            target.write_text(line * 3 if rel.suffix == ".jsonl" else line)
    with env.daemon(mirror_deletes=mirror_deletes, rescan_interval_s=0.5) as daemon:
        wait_mirrored(env.root, reader)
        swapped = sorted(
            p.relative_to(env.root).as_posix()
            for run in ("run-001", "run-002")
            for p in (env.root / "runs" / run).rglob("*")
            if p.is_file()
        )
        os.rename(env.root / "runs/run-001", tmp_path / "aside-1")
        os.symlink(secret / "run-001", env.root / "runs/run-001")  # the run directory
        bench = env.root / "runs/run-002/gsm8k"
        os.rename(bench, tmp_path / "aside-2")
        os.symlink(secret / "run-002/gsm8k", bench)  # a directory inside a run
        store.write_trajectory("run-000", "gsm8k", _trajectory(99, "gsm8k"))
        seen = "delete_mirrored" if mirror_deletes else "local_file_deleted"
        gone = [p for p in swapped if p.startswith("runs/run-001/") or "/gsm8k/" in p]

        def handled() -> bool:
            keys = {e.get("key") for e in daemon.log_events() if e.get("event") == seen}
            return set(gone) <= keys

        wait_for(handled, 30, what="the swapped files seen as gone")
        appended = "runs/run-000/gsm8k/trajectories.jsonl"
        wait_for(
            lambda: read_keys(reader, [appended])[appended] == (env.root / appended).read_bytes(),
            30,
            what="the next append mirrored",
        )
        for name, r in env.readers.items():
            leaked = [k for k, v in remote_tree(r).items() if b"SECRET" in v]
            assert not leaked, f"{name}: bytes from outside the root in {leaked}"
        assert all(reader.exists(p) is not mirror_deletes for p in gone)
        assert not any(e.get("event") == "file_unreadable" for e in daemon.log_events())


@pytest.mark.parametrize("old_journal", [False, True])
def test_a_daemon_started_on_the_mount_point_adopts_the_volume_when_it_is_mounted(
    env: Env, tmp_path: Path, old_journal: bool
) -> None:
    """A daemon started at boot before its volume is mounted (another, empty directory
    at the root) holds deletions; when the journal's own root comes back under it, it
    adopts it without a restart: new files are mirrored and deletions mirror again.
    With a journal from before the root's record (an upgrade while unmounted), the
    first directory with files there is adopted and recorded."""
    reader = env.add("s3", retry={"initial_backoff_s": 0.1, "max_backoff_s": 0.5})
    store = EvalStore(env.root)
    _write_runs(store, 2, 3)
    cfg = write_config(env.tmp / "config.toml", env.root, env.state, env.dests)
    assert evalsyncd("sync", "--once", "--config", str(cfg)).returncode == 0
    if old_journal:
        db = sqlite3.connect(env.state / "journal.sqlite3")
        with db:
            db.execute("DELETE FROM meta WHERE key = 'root_id'")
        db.close()
    before = remote_tree(reader)
    aside = tmp_path / "volume"
    os.rename(env.root, aside)
    env.root.mkdir()  # the empty mount point
    with env.daemon(mirror_deletes=True, rescan_interval_s=0.5) as daemon:
        wait_for(
            lambda: any(e.get("event") == "root_replaced" for e in daemon.log_events()),
            30,
            what="root_replaced",
        )
        wait_for(
            lambda: any(e.get("event") == "pass_finished" for e in daemon.log_events()),
            30,
            what="a pass on the mount point",
        )
        assert remote_tree(reader) == before
        env.root.rmdir()
        os.rename(aside, env.root)  # mounted
        store.write_trajectory("run-000", "gsm8k", _trajectory(77, "gsm8k"))
        wait_mirrored(env.root, reader)
        assert any(e.get("event") == "root_returned" for e in daemon.log_events())
        os.remove(env.root / "runs/run-001/math/trajectories.jsonl")
        wait_for(
            lambda: not reader.exists("runs/run-001/math/trajectories.jsonl"),
            30,
            what="a deletion mirrored after the root came back",
        )
    status = evalsyncd("status", "--json", "--config", str(cfg))
    assert status.returncode == 0 and json.loads(status.stdout)["root_replaced"] is False


def test_an_old_journal_started_on_an_empty_mount_point_deletes_nothing(
    env: Env, tmp_path: Path
) -> None:
    """A journal from before the root's record (an upgrade while the volume is not
    mounted) meets an empty root while it holds live rows: nothing is deleted and that
    directory is not recorded; the volume back, the root is recorded and all is well."""
    reader = env.add("s3")
    _write_runs(EvalStore(env.root), 2, 3)
    cfg = write_config(env.tmp / "config.toml", env.root, env.state, env.dests, mirror_deletes=True)
    assert evalsyncd("sync", "--once", "--config", str(cfg)).returncode == 0
    before = remote_tree(reader)
    db = sqlite3.connect(env.state / "journal.sqlite3")
    with db:
        db.execute("DELETE FROM meta WHERE key = 'root_id'")  # as an older version left it
    db.close()
    os.rename(env.root, tmp_path / "volume")
    env.root.mkdir()
    held = evalsyncd("sync", "--once", "--config", str(cfg))
    assert held.returncode == 0 and "root_replaced" in held.stderr, held.stderr[-2000:]
    assert remote_tree(reader) == before
    status = evalsyncd("status", "--json", "--config", str(cfg))  # as the daemon judged it
    assert status.returncode == 1 and json.loads(status.stdout)["root_replaced"] is True
    env.root.rmdir()
    os.rename(tmp_path / "volume", env.root)
    back = evalsyncd("sync", "--once", "--config", str(cfg))
    assert back.returncode == 0 and "root_replaced" not in back.stderr, back.stderr[-2000:]
    status = json.loads(evalsyncd("status", "--json", "--config", str(cfg)).stdout)
    assert status["root_replaced"] is False
    assert remote_tree(reader) == before


def test_a_fifo_behind_a_symlinked_run_never_blocks_a_pass(env: Env, tmp_path: Path) -> None:
    """A mirrored run directory swapped for a symlink to a directory whose
    ``metadata.json`` is a FIFO, on a root that is another directory (its rows stay as
    they were, live): no step reads through the symlink (the run catalog included,
    which reads every live run's ``metadata.json``), so nothing blocks, and a new run
    is mirrored and listed."""
    reader = env.add("s3")
    _write_runs(EvalStore(env.root), 2, 3)
    cfg = write_config(env.tmp / "config.toml", env.root, env.state, env.dests)
    assert evalsyncd("sync", "--once", "--config", str(cfg)).returncode == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    os.mkfifo(outside / "metadata.json")
    os.rename(env.root, tmp_path / "aside")
    (env.root / "runs").mkdir(parents=True)
    os.symlink(outside, env.root / "runs/run-000")
    store = EvalStore(env.root)
    run_id = store.create_run("m", ["gsm8k"], run_id="run-new")
    store.write_trajectory(run_id, "gsm8k", _trajectory(0, "gsm8k"))
    store.finalize_run(run_id)
    done = evalsyncd("sync", "--once", "--config", str(cfg), timeout_s=60.0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert reader.exists("runs/run-new/gsm8k/trajectories.jsonl")
    assert "run-new" in [r.run_id for r in EvalStore(reader).list_runs()]


def test_a_root_moved_away_deletes_nothing_and_syncing_resumes_when_it_is_back(
    env: Env, tmp_path: Path
) -> None:
    """The watched root moved aside (or a volume unmounted from under it) looks like every
    file deleted; with mirror_deletes on, nothing may go. Passes fail naming the root
    (backoff) while full rescans find nothing; once it is back, mirroring resumes."""
    reader = env.add("s3", retry={"initial_backoff_s": 0.1, "max_backoff_s": 0.5})
    store = EvalStore(env.root)
    _write_runs(store, 2, 3)
    with env.daemon(mirror_deletes=True, rescan_interval_s=0.5) as daemon:
        wait_mirrored(env.root, reader)
        before = remote_tree(reader)
        aside = tmp_path / "aside"
        os.rename(env.root, aside)

        def refused() -> int:
            return sum(
                1
                for e in daemon.log_events()
                if e.get("event") == "pass_failed" and "RootChangedError" in e.get("error", "")
            )

        wait_for(lambda: refused() >= 3, 30, what="passes refused while the root is gone")
        assert str(env.root) in next(
            e["error"] for e in daemon.log_events() if e.get("event") == "pass_failed"
        )
        assert remote_tree(reader) == before  # nothing deleted
        os.rename(aside, env.root)
        store.write_trajectory("run-000", "gsm8k", _trajectory(99, "gsm8k"))
        wait_mirrored(env.root, reader)
        assert set(before) <= set(remote_tree(reader))


def test_a_start_on_another_directory_at_the_root_deletes_nothing_until_adopted(
    env: Env, tmp_path: Path
) -> None:
    """A start whose root is another directory than the one the journal mirrored (the
    empty mount point of a volume not mounted yet; here the root moved aside and an
    empty directory made in its place) sees every file as deleted: with mirror_deletes
    on, no object may go, in that start or the next. When the root is back, deletions
    mirror again; a root moved on purpose is adopted with --adopt-root."""
    reader = env.add("s3")
    mirror = env.add("local", name="nfs")
    _write_runs(EvalStore(env.root), 2, 3)
    cfg = write_config(env.tmp / "config.toml", env.root, env.state, env.dests, mirror_deletes=True)

    def sync(*extra: str) -> str:
        done = evalsyncd(
            "sync", "--once", "--config", str(cfg), *extra, env={"EVALSYNCD_LOG_LEVEL": "debug"}
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    sent = ("upload_succeeded", "tail_written", "delete_mirrored", "local_file_deleted")
    assert "upload_succeeded" in sync()
    before = {name: wait_mirrored(env.root, r) for name, r in env.readers.items()}
    aside = tmp_path / "aside"
    os.rename(env.root, aside)
    env.root.mkdir()  # the mount point: empty, another inode (and on a volume, device)
    for _ in range(2):  # a restart (systemd's Restart=) changes nothing
        held = sync()
        assert "root_replaced" in held
        assert not [e for e in sent if e in held]
        assert remote_tree(reader) == before["s3"]
        assert remote_tree(mirror) == before["nfs"]
    status = evalsyncd("status", "--json", "--config", str(cfg))
    assert json.loads(status.stdout)["root_replaced"] is True
    assert status.returncode == 1 and "root replaced" in status.stderr  # for monitoring
    assert "--adopt-root" in evalsyncd("status", "--config", str(cfg)).stdout

    env.root.rmdir()
    os.rename(aside, env.root)  # mounted: the journal's root again
    back = sync()
    assert "root_replaced" not in back
    assert not [e for e in sent if e in back]  # rows left as they were: nothing resent
    wait_mirrored(env.root, reader)
    os.remove(env.root / "runs/run-001/math/trajectories.jsonl")  # deletions mirror again
    sync()
    assert not reader.exists("runs/run-001/math/trajectories.jsonl")
    wait_mirrored(env.root, mirror)

    moved = tmp_path / "moved"  # a root restored elsewhere, then put in place on purpose
    os.rename(env.root, moved)
    env.root.mkdir()
    (env.root / "runs.jsonl").write_bytes((moved / "runs.jsonl").read_bytes())
    assert "root_replaced" in sync()
    assert reader.exists("runs/run-000/metadata.json")
    assert "root_adopted" in sync("--adopt-root")
    assert not reader.exists("runs/run-000/metadata.json")  # adopted: its deletions mirror
    assert (
        json.loads(evalsyncd("status", "--json", "--config", str(cfg)).stdout)["root_replaced"]
        is False
    )
    assert reader.exists("runs.jsonl")
    os.remove(env.root / "runs.jsonl")
    assert "root_replaced" not in sync()
    assert not reader.exists("runs.jsonl")


def test_broken_destination_does_not_hold_back_others(env: Env) -> None:
    """A destination whose credentials are refused is parked; the healthy ones keep mirroring."""
    # SeaweedFS creates missing buckets on the fly, so the permanent error here is
    # access denied: a profile whose keys the server does not know.
    creds = Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"])
    if "[evalsyncd-wrong]" not in (creds.read_text() if creds.exists() else ""):
        with open(creds, "a") as f:
            f.write(
                "\n[evalsyncd-wrong]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n"
            )
    env.dests.append(
        {
            "name": "broken",
            "url": f"s3://{S3_BUCKET}/{env.prefix}/broken",
            "endpoint_url": env.s3_endpoint,
            "profile": "evalsyncd-wrong",
        }
    )
    good = env.add("file")
    with env.daemon() as daemon:
        _write_runs(EvalStore(env.root), 2, 3)
        wait_mirrored(env.root, good)
        wait_for(
            lambda: any(
                e.get("event") == "destination_state"
                and e.get("destination") == "broken"
                and e.get("new") == "parked"
                and "AccessDenied" in (e.get("reason") or "")
                for e in daemon.log_events()
            ),
            30,
        )
        # status says so, and exits 1 (a parked destination waits for a person)
        status = evalsyncd("status", "--config", str(daemon.config))
        assert status.returncode == 1, status
        assert "broken (s3://" in status.stdout and "parked" in status.stdout
        assert "parked: broken" in status.stderr
        report = evalsyncd("status", "--json", "--config", str(daemon.config))
        assert report.returncode == 1
        states = {d["name"]: d["state"] for d in json.loads(report.stdout)["destinations"]}
        assert states == {"file": "healthy", "broken": "parked"}, states


def test_sigterm_exits_zero_and_restart_resumes(env: Env) -> None:
    """SIGTERM exits 0; a restart resumes from the journal without re-uploading."""
    reader = env.add("file")
    store = EvalStore(env.root)
    daemon = env.daemon(log_level="debug")  # per-upload events are debug
    with daemon:
        _write_runs(store, 1, 10)
        wait_mirrored(env.root, reader)
    assert daemon.proc is not None and daemon.proc.returncode == 0
    before = sum(1 for e in daemon.log_events() if e.get("event") == "upload_succeeded")
    with daemon:
        store.write_trajectory("run-000", "gsm8k", _trajectory(99, "gsm8k"))
        wait_mirrored(env.root, reader)
    uploads = [e for e in daemon.log_events() if e.get("event") == "upload_succeeded"][before:]
    assert [(e["key"], e["op"]) for e in uploads] == [
        ("runs/run-000/gsm8k/trajectories.jsonl", "append")
    ]


def test_sync_once_mirrors_and_exits_zero(env: Env) -> None:
    """`evalsyncd sync --once` catches up everything and exits 0."""
    import subprocess
    import sys

    reader = env.add("gcs")
    _write_runs(EvalStore(env.root), 2, 5)
    cfg = write_config(env.tmp / "c.toml", env.root, env.state, env.dests)
    out = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "sync", "--once", "--config", str(cfg)],
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert remote_tree(reader) == expected_mirror(env.root)


def test_polling_observer_for_network_filesystems(env: Env) -> None:
    """With observer = "polling" (no inotify), new runs and appends are still mirrored."""
    reader = env.add("file")
    store = EvalStore(env.root)
    with env.daemon(observer="polling", polling_interval_s=0.2, rescan_interval_s=60.0):
        _write_runs(store, 2, 3)
        wait_mirrored(env.root, reader, timeout_s=30)
        store.write_trajectory("run-001", "math", _trajectory(50, "math"))
        wait_mirrored(env.root, reader, timeout_s=30)


def test_file_name_not_utf8_is_reported_and_others_continue(env: Env) -> None:
    """A file whose name is not valid UTF-8 cannot be a key: it is reported, the rest mirrors."""
    reader = env.add("file")
    bad = os.path.join(os.fsencode(env.root), b"runs", b"bad-\xff.json")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
        f.write(b"{}")
    with env.daemon() as daemon:
        _write_runs(EvalStore(env.root), 1, 2)
        wait_for(
            lambda: reader.exists("runs/run-000/metadata.json") and reader.exists("runs.jsonl"), 30
        )
        wait_for(
            lambda: any(
                e.get("event") == "file_not_mirrorable" and "UTF-8" in e.get("error", "")
                for e in daemon.log_events()
            ),
            30,
        )
        assert daemon.alive()
