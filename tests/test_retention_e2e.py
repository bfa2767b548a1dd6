"""Retention end to end: the real daemon, real S3 and GCS servers, ``kill -9`` while it evicts.

Ends with every run's bytes present either on the local disk or, for an evicted run,
as plain objects in every destination, byte for byte, and every read of the store
(local root plus the mirror as fallback) answering as before the eviction.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

from evalsyncd import EvalStore
from evalsyncd.evicted import MARKER_NAME
from evalsyncd.storage import AnyStorage, GCSStorage, S3Storage
from evalsyncd.store import BenchmarkResult, StoredTrajectory
from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import wait_for
from tests.reliability import RelEnv, events, s3_main_object, wait_started

RUNS = 16


def _write_runs(root: Path) -> dict[str, bytes]:
    """RUNS finalized runs dated two days back; returns every file's bytes by path."""
    store = EvalStore(root)
    for r in range(RUNS):
        run_id = store.create_run("m", ["gsm8k"], run_id=f"run{r:02d}")
        for i in range(30 + r):
            store.write_trajectory(
                run_id, "gsm8k", StoredTrajectory(idx=i, benchmark="gsm8k", reward=i % 2)
            )
        store.write_result(run_id, BenchmarkResult("gsm8k", 0.5, 30 + r, 15))
        store.write_summary(run_id, {})
        store.finalize_run(run_id)
    old = time.time() - 2 * 86400
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _evicted(state: Path) -> int:
    path = state / "journal.sqlite3"
    if not path.exists():
        return 0
    con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return int(
            con.execute("SELECT count(*) FROM evictions WHERE state='evicted'").fetchone()[0]
        )
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def test_kill_9_during_eviction_never_loses_a_run(
    rel: RelEnv, s3_server: SeaweedS3Server, gcs_server: FakeGCSServer
) -> None:
    """SIGKILL at random moments while the daemon mirrors and evicts 16 runs to S3 and GCS:
    in the end each run's files are on disk, or the run is marked evicted and both
    destinations hold every file as a plain object equal to the original bytes; reads
    through EvalStore(root, fallback=mirror) return the originals.

    Every answer comes back 5 ms late (a bucket in the next region, not on loopback), so
    that proving a run takes longer than the test takes to notice an eviction and kill:
    on a loaded machine the daemon could otherwise evict every run before a third kill.
    """
    with (
        FaultProxy("127.0.0.1", s3_server.port) as s3_proxy,
        FaultProxy("127.0.0.1", gcs_server.port) as gcs_proxy,
    ):
        for proxy in (s3_proxy, gcs_proxy):
            proxy.add(Rule("delay", times=None, delay_s=0.005))
        _kill_during_eviction(
            rel,
            rel.add("s3", endpoint_url=s3_proxy.url, compact_idle_s=0.2, max_main_lag_s=1.0),
            rel.add("gcs", endpoint_url=gcs_proxy.url, compact_idle_s=0.2, max_main_lag_s=1.0),
        )


def _kill_during_eviction(rel: RelEnv, s3: AnyStorage, gcs: AnyStorage) -> None:
    assert isinstance(s3, S3Storage) and isinstance(gcs, GCSStorage)
    original = _write_runs(rel.root)
    before = EvalStore(rel.root)
    want = {
        f"run{r:02d}": (
            before.read_result(f"run{r:02d}", "gsm8k"),
            before.read_trajectories(f"run{r:02d}", "gsm8k"),
        )
        for r in range(RUNS)
    }
    daemon = rel.daemon(
        flush_interval_s=0.05,
        **{
            "retention.enabled": True,
            "retention.min_age_s": 60.0,
            "retention.interval_s": 0.1,
        },
    )
    rng = random.Random(19)
    kills = 0
    try:
        while _evicted(rel.state) < RUNS and kills < 30:
            started = len(events(daemon, "daemon_started"))
            evicted = len(events(daemon, "run_evicted"))
            daemon.start()
            wait_started(daemon, count=started + 1)
            # let it get into its evictions, then kill it in the middle of the next ones
            wait_for(
                lambda n=evicted: len(events(daemon, "run_evicted")) > n or not daemon.alive(),
                timeout_s=60,
                interval_s=0.01,
                what="an eviction",
            )
            time.sleep(rng.uniform(0.0, 0.08))
            daemon.kill()
            kills += 1
        daemon.start()
        wait_for(lambda: _evicted(rel.state) == RUNS, timeout_s=120, what="every run evicted")
    finally:
        if daemon.alive():
            daemon.terminate()
    assert kills >= 3, "the daemon evicted everything before it could be killed"
    gcs.read_tail = False  # the plain objects
    for path, data in original.items():
        run_dir = rel.root / "/".join(path.split("/")[:2])
        local = rel.root / path
        if local.exists():
            assert local.read_bytes() == data, path
            continue
        assert (run_dir / MARKER_NAME).exists(), f"{path} gone, its run not marked evicted"
        assert s3_main_object(s3, path) == data, f"s3: {path}"
        assert gcs.read(path) == data, f"gcs: {path}"
    kept = {p.relative_to(rel.root).as_posix() for p in rel.root.rglob("*") if p.is_file()}
    assert "runs.jsonl" in kept and all(
        f"runs/run{r:02d}/metadata.json" in kept for r in range(RUNS)
    )
    # a kill between the journal's commit and the log line loses the line, not the eviction
    logged = [e["run_id"] for e in events(daemon, "run_evicted")]
    assert len(logged) == len(set(logged)), "a run evicted twice"
    reader = EvalStore(
        rel.root, fallback=S3Storage(s3.bucket, s3.prefix, endpoint_url=s3.endpoint_url)
    )
    with reader.fallback:  # type: ignore[union-attr]
        assert all(r.evicted for r in reader.list_runs())
        for run_id, (result, trajectories) in want.items():
            assert reader.read_result(run_id, "gsm8k") == result
            assert reader.read_trajectories(run_id, "gsm8k") == trajectories


def test_checks_cost_one_request_per_file_per_destination(
    tmp_path: Path,
    cloud_env: dict[str, str],
    s3_server: object,
    gcs_server: object,
    unique_prefix: str,
) -> None:
    """Against SeaweedFS and fake-gcs-server behind counting proxies: proving a mirrored
    run safe costs at most one request per file per destination (GCS: a metadata read)."""
    import asyncio
    import urllib.parse

    from evalsyncd.testing.proxy import CountingProxy
    from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server
    from tests.conftest import GCS_BUCKET, S3_BUCKET
    from tests.test_retention import Rig

    assert isinstance(s3_server, SeaweedS3Server) and isinstance(gcs_server, FakeGCSServer)
    ports = [urllib.parse.urlparse(s.endpoint_url).port for s in (s3_server, gcs_server)]
    with CountingProxy("127.0.0.1", ports[0]) as p3, CountingProxy("127.0.0.1", ports[1]) as pg:
        s3 = S3Storage(S3_BUCKET, f"{unique_prefix}/s3", endpoint_url=p3.url)
        gcs = GCSStorage(GCS_BUCKET, f"{unique_prefix}/gcs", endpoint_url=pg.url)
        rig = Rig(tmp_path, [s3, gcs])  # type: ignore[list-item]
        store = EvalStore(rig.root)
        from tests.test_retention import _age, _write_run

        run = _write_run(store, "r", n=50)
        _age(rig.root, run, 2 * 86400)

        async def scenario() -> dict[str, int]:
            from evalsyncd.sync.retention import prove, scan_runs

            async with s3, gcs:
                await rig.sync()
                for i in range(50, 60):  # appended after the first upload
                    store.write_trajectory(
                        run, "math", StoredTrajectory(idx=i, benchmark="math", reward=0)
                    )
                _age(rig.root, run, 2 * 86400)
                await rig.sync()
                for s in (s3, gcs):
                    s.read_tail = False
                (r,) = scan_runs(rig.root)
                p3.reset()
                pg.reset()
                proof, why = await prove(rig.root, r, rig.mirrors())
                assert proof is not None, why
                return {"files": len(r.files), "s3": p3.requests, "gcs": pg.requests}

        got = asyncio.run(scenario())
        rig.journal.close()
    assert got["gcs"] <= got["files"] and got["s3"] <= got["files"], got
