"""Reliability under faults: crashes, outages, throttling, flaky networks, bad shutdowns.

Every test runs the real daemon (a subprocess) against real servers and ends
with every destination equal to the local files, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from evalsyncd.storage import S3Storage
from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import wait_for
from tests.reliability import (
    MiB,
    RelEnv,
    append_line,
    assert_lines_once,
    daemon_pid,
    events,
    list_keys,
    proc_status_kib,
    s3_main_object,
    s3_multipart_uploads,
    wait_settled,
    wait_started,
)


class Writer(threading.Thread):
    """Appends numbered lines to ``runs`` trajectory files until stopped; counts them."""

    def __init__(self, root: Path, runs: int, *, seed: int = 1, pause_s: float = 0.002) -> None:
        super().__init__(name="writer", daemon=True)
        self.paths = [root / f"runs/run-{i}/bench/trajectories.jsonl" for i in range(runs)]
        for p in self.paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(seed)
        self.pause_s = pause_s
        self.stop_event = threading.Event()
        self.lines = 0
        self.write_s: list[float] = []
        self._running = threading.Event()
        self._running.set()
        self._writing = threading.Lock()

    def pause(self) -> None:
        """Stop writing (returns once no write is in progress)."""
        self._running.clear()
        with self._writing:
            pass

    def resume(self) -> None:
        """Write again."""
        self._running.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            if not self._running.wait(0.1):
                continue
            with self._writing:
                if self._running.is_set():  # pause() may have come in between
                    self._write_one()
            time.sleep(self.pause_s)

    def _write_one(self) -> None:
        p = self.paths[self.rng.randrange(len(self.paths))]
        started = time.perf_counter()
        append_line(p, {"n": self.lines, "pad": "x" * self.rng.randrange(10, 2000)})
        self.write_s.append(time.perf_counter() - started)
        self.lines += 1
        if self.lines % 50 == 0:  # a replace-on-write file changing too
            meta = p.parent.parent / "metadata.json"
            tmp = meta.with_name(".metadata.json.tmp")
            tmp.write_text(json.dumps({"lines": self.lines}))
            os.replace(tmp, meta)

    def finish(self) -> int:
        self.stop_event.set()
        self.join(10)
        return self.lines


def test_crash_loop_sigkill_30_times_loses_and_doubles_nothing(rel: RelEnv) -> None:
    """SIGKILL at 32 random moments while lines are appended: every object equals its file, every line once."""
    s3 = rel.add("s3", compact_idle_s=0.5)
    rel.add("gcs")
    rel.add("file")
    writer = Writer(rel.root, runs=4)
    writer.start()
    rng = random.Random(11)
    daemon = rel.daemon(flush_interval_s=0.05)
    try:
        for i in range(32):
            started = len(events(daemon, "daemon_started"))
            daemon.start()
            if i % 3 == 0:  # sometimes let it get into its uploads first
                wait_started(daemon, count=started + 1)
            time.sleep(rng.uniform(0.05, 0.8))
            daemon.kill()
    finally:
        total = writer.finish()
        if daemon.alive():
            daemon.kill()
    with daemon:
        mirrors = wait_settled(rel, timeout_s=120)
    for name, mirror in mirrors.items():
        assert assert_lines_once(mirror) == total, f"{name}: lost lines"
    assert isinstance(s3, S3Storage)
    for path, data in mirrors["s3"].items():  # tools that read only the main object see a prefix
        assert data.startswith(s3_main_object(s3, path))


_PROBE_AND_REAP = r"\.evalsyncd(/|%2F)probe|[?&]uploads&prefix=|[?&]prefix=[^&]*gcs-append"
"""Requests of the server probe and of the leftovers' reaping, both at the daemon's start."""


def _faults(kind: str) -> list[Rule]:
    """A random mix of faults on a share of the requests that change or read objects."""
    if kind == "s3":
        throttle = [Rule("slowdown", times=None, probability=0.08)]
    else:
        throttle = [
            Rule("status", status=429, times=None, probability=0.05),
            Rule("status", status=503, times=None, probability=0.04),
        ]
    return [
        # the server probe at start (objects under .evalsyncd/probe/, names URL-encoded on
        # GCS) is left alone: the faults below are counted for the daemon's data path
        Rule("pass", path_regex=_PROBE_AND_REAP, times=None),
        # a burst longer than the SDK's own retries: the daemon's backoff takes over
        Rule("slowdown" if kind == "s3" else "status", times=12, skip=15),
        *throttle,
        # lost responses at the points that matter: object PUTs, multipart
        # completion, GCS uploads and composes
        Rule("reset_after", method="PUT", times=3, skip=3),
        Rule("reset_after", path_contains="uploadId=", method="POST", times=2),
        Rule("reset_after", path_contains="/compose", times=2, skip=1),
        Rule("reset_after", path_contains="uploadType=multipart", times=2, skip=2),
        Rule("reset_before", times=None, probability=0.04),
        # the server applies the write, the client never hears of it
        Rule("reset_after", method="PUT", times=None, probability=0.08),
        Rule("reset_after", method="POST", times=None, probability=0.08),
        Rule("delay", delay_s=2.5, times=1, skip=30),
    ]


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_throttling_resets_and_lost_responses_duplicate_nothing(
    rel: RelEnv, kind: str, s3_server: SeaweedS3Server, gcs_server: FakeGCSServer
) -> None:
    """SlowDown/429/503, connection resets before and after the server applied a write, and responses delayed past the timeout: bounded backoff, no crash, every line once."""
    server_port = s3_server.port if kind == "s3" else gcs_server.port
    big = rel.root / "runs/big/bench/trajectories.jsonl"  # appends to it use multipart on S3
    big.parent.mkdir(parents=True)
    line = json.dumps({"n": -1, "pad": "b" * 4000}) + "\n"
    big.write_text("".join(line.replace("-1", str(-1 - i)) for i in range(1400)))  # ~5.6 MiB
    with FaultProxy("127.0.0.1", server_port, seed=5) as proxy:
        retry = {
            "initial_backoff_s": 0.1,
            "max_backoff_s": 1.0,
            "connect_timeout_s": 1.0,
            "read_timeout_s": 1.5,
        }
        rel.add(kind, endpoint_url=proxy.url, retry=retry, compact_idle_s=0.5)
        for rule in _faults(kind):
            proxy.add(rule)
        writer = Writer(rel.root, runs=3, pause_s=0.005)
        with rel.daemon(flush_interval_s=0.1) as daemon:
            writer.start()
            deadline = time.monotonic() + 7.0
            n = 0
            while time.monotonic() < deadline:  # the big file grows by a line now and then
                append_line(big, {"n": f"big-{n}", "pad": "B" * 3000})
                n += 1
                time.sleep(0.3)
            total = writer.finish()
            wait_for(lambda: proxy.fired() >= 10, 30, 0.1, "faults injected")
            proxy.clear()
            mirror = wait_settled(rel, timeout_s=90)[kind]
            assert daemon.alive()
            failures = events(daemon, "pass_failed")
    counts = {
        a: proxy.fired(a) for a in ("slowdown", "status", "reset_before", "reset_after", "delay")
    }
    print(f"faults injected: {counts} of {len(proxy.log)} requests; passes failed: {len(failures)}")
    print(
        sorted(
            {
                (m, t.split("?")[1][:30] if "?" in t else "")
                for m, t, a in proxy.log
                if a == "reset_after"
            }
        )
    )
    assert counts["reset_after"] > 0
    assert assert_lines_once(mirror) == total + 1400 + n
    assert failures, "no fault reached the daemon"
    assert max(e["retry_in_s"] for e in failures) <= retry["max_backoff_s"]


def test_sigterm_during_multipart_append_leaves_no_orphans(
    rel: RelEnv, s3_server: SeaweedS3Server, gcs_server: FakeGCSServer
) -> None:
    """SIGTERM while a large append is in flight (S3 multipart, GCS compose) and a restart: no orphaned upload or temporary object, content right."""
    path = rel.root / "runs/r/bench/trajectories.jsonl"
    path.parent.mkdir(parents=True)
    chunk = (json.dumps({"pad": "y" * 1000}) + "\n").encode() * (MiB // 1000)
    path.write_bytes(chunk * 6)  # ~6 MiB: S3 appends are multipart from here on
    with (
        FaultProxy("127.0.0.1", s3_server.port) as s3_proxy,
        FaultProxy("127.0.0.1", gcs_server.port) as gcs_proxy,
    ):
        retry = {"initial_backoff_s": 0.1, "max_backoff_s": 1.0, "read_timeout_s": 10.0}
        s3 = rel.add("s3", endpoint_url=s3_proxy.url, retry=retry)
        gcs = rel.add("gcs", endpoint_url=gcs_proxy.url, retry=retry)
        daemon = rel.daemon(stop_timeout_s=0.5)
        with daemon:
            wait_settled(rel, timeout_s=60)
            # hold the completing requests of the next append in flight
            s3_proxy.add(Rule("delay", method="POST", path_contains="uploadId=", delay_s=5.0))
            gcs_proxy.add(Rule("delay", path_contains="/compose", delay_s=5.0))
            with open(path, "ab") as f:
                f.write(chunk * 2)
            wait_for(lambda: s3_proxy.fired("delay") and gcs_proxy.fired("delay"), 30, 0.05)
            assert daemon.terminate() == 0
        s3_proxy.clear()
        gcs_proxy.clear()
        with open(path, "ab") as f:
            f.write(chunk)
        with daemon:
            wait_settled(rel, timeout_s=60)
    assert isinstance(s3, S3Storage)
    assert s3_multipart_uploads(s3) == []
    # nothing left in the internal areas but the prefixes' owner claims
    assert list_keys(gcs, internal=True) == [".evalsyncd/owner.json"]
    assert list_keys(s3, internal=True) == [".evalsyncd/owner.json"]


def _throughput(writer: Writer, seconds: float) -> float:
    start_lines, start = writer.lines, time.monotonic()
    time.sleep(seconds)  # a measurement window, not synchronisation
    return (writer.lines - start_lines) / (time.monotonic() - start)


def _outage(rel: RelEnv, tmp_path: Path, outage_s: float, warmup_s: float = 0.0) -> None:
    """Stop both servers for ``outage_s`` seconds while a writer appends.

    Memory is compared with the level after ``warmup_s`` seconds of outage: a long
    outage makes each pending delta as large as an upload chunk, so the working set
    grows once (bounded by the per-destination byte budget), then must stay flat.
    """
    s3_server = SeaweedS3Server(tmp_path / "outage-s3").start()
    gcs_server = FakeGCSServer(tmp_path / "outage-gcs").start()
    try:
        s3_server.create_bucket(S3_BUCKET)
        gcs_server.create_bucket(GCS_BUCKET)
        rel.s3_endpoint, rel.gcs_endpoint = s3_server.endpoint_url, gcs_server.endpoint_url
        rel.add("s3")
        rel.add("gcs")
        rel.add("file")
        writer = Writer(rel.root, runs=3, pause_s=0.005)
        with rel.daemon(log_level="debug") as daemon:  # per-upload events are debug
            writer.start()
            _throughput(writer, 1.0)
            writer.pause()  # a mirror equals a file that is not being written
            wait_settled(rel, timeout_s=60, readers=["file"])
            writer.resume()
            pid = daemon_pid(daemon)
            before = _throughput(writer, 1.5)
            rss_before = proc_status_kib(pid, "VmRSS")
            s3_server.stop()
            gcs_server.stop()
            wait_for(lambda: len(events(daemon, "pass_failed")) >= 2, 30, 0.1, "failures")
            if warmup_s:
                _throughput(writer, warmup_s)
                rss_before = proc_status_kib(pid, "VmRSS")
            during = _throughput(writer, outage_s - warmup_s)
            rss_during = proc_status_kib(pid, "VmRSS")
            # a down destination holds back no other
            assert events(daemon, "upload_succeeded")[-1]["destination"] == "file"
            s3_server.start(restart=True)
            gcs_server.start(restart=True)
            total = writer.finish()
            mirrors = wait_settled(rel, timeout_s=120)
            assert daemon.alive()
        print(f"writer {before:.0f} -> {during:.0f} lines/s; RSS {rss_before} -> {rss_during} KiB")
        assert during >= 0.5 * before, "writers were slowed by the outage"
        assert rss_during <= rss_before * 1.3 + 20 * 1024, "daemon memory grew during the outage"
        for mirror in mirrors.values():
            assert assert_lines_once(mirror) == total
    finally:
        s3_server.stop()
        gcs_server.stop()


def test_outage_writers_unslowed_memory_flat_catch_up(rel: RelEnv, tmp_path: Path) -> None:
    """S3 and GCS down for a while: writers keep their pace, daemon RSS stays flat, and the same daemon catches up."""
    _outage(rel, tmp_path, outage_s=4.0)


@pytest.mark.slow
def test_outage_of_minutes(rel: RelEnv, tmp_path: Path) -> None:
    """As the outage test, with the servers down for three minutes (memory flat after the first minute)."""
    _outage(rel, tmp_path, outage_s=180.0, warmup_s=60.0)
