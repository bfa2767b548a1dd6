"""Property test: random sequences of writer operations, daemon crashes and server
outages always settle into destinations equal to the expected mirror.

Bounded for CI (a few examples). The long variant runs by hand::

    EVALSYNCD_LONG_PROPERTY=1 pytest tests/test_reliability_property.py -m slow -s
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.daemon import Daemon
from tests.reliability import RelEnv, wait_settled, wait_started

RUNS = ("run-a", "run-b", "run-c")

_ops = st.one_of(
    st.tuples(st.just("create_run"), st.sampled_from(RUNS)),
    st.tuples(st.just("append"), st.sampled_from(RUNS), st.integers(1, 40), st.booleans()),
    st.tuples(st.just("write_json"), st.sampled_from(RUNS), st.integers(0, 3000)),
    st.tuples(st.just("truncate"), st.sampled_from(RUNS), st.integers(0, 100)),
    st.tuples(st.just("delete"), st.sampled_from(RUNS)),
    st.tuples(st.just("crash")),
    st.tuples(st.just("stop_server"), st.sampled_from(["s3", "gcs"])),
    st.tuples(st.just("restart"), st.sampled_from(["daemon", "s3", "gcs"])),
    st.tuples(st.just("pause"), st.floats(0.0, 1.0)),
)


class World:
    """The servers (dedicated to this test, so they can be stopped), a root and a daemon."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.s3 = SeaweedS3Server(base / "s3").start()
        self.gcs = FakeGCSServer(base / "gcs").start()
        self.s3.create_bucket(S3_BUCKET)
        self.gcs.create_bucket(GCS_BUCKET)
        self.counter = itertools.count()

    def close(self) -> None:
        self.s3.stop()
        self.gcs.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, cloud_env: dict[str, str]) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("property"))
    yield w
    w.close()


def _apply(
    op: tuple[object, ...], env: RelEnv, daemon: Daemon, world: World, down: set[str]
) -> None:
    kind = op[0]
    if kind in ("create_run", "append", "write_json", "truncate", "delete"):
        run = env.root / "runs" / str(op[1])
        traj = run / "bench" / "trajectories.jsonl"
    if kind == "create_run":
        traj.parent.mkdir(parents=True, exist_ok=True)
        (run / "metadata.json").write_text(json.dumps({"run_id": op[1]}))
    elif kind == "append":
        traj.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(
            json.dumps({"n": next(world.counter)}) + "\n"
            for _ in range(int(op[2]))  # type: ignore[call-overload]
        )
        if op[3]:  # leave a partial last line
            lines += '{"partial": '
        with open(traj, "a") as f:
            f.write(lines)
    elif kind == "write_json":
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / ".summary.json.tmp"
        tmp.write_text(json.dumps({"score": op[2], "pad": "s" * int(op[2])}))  # type: ignore[call-overload]
        os.replace(tmp, run / "summary.json")
    elif kind == "truncate":
        if traj.exists():
            with open(traj, "r+b") as f:
                f.truncate(min(int(op[2]), traj.stat().st_size))  # type: ignore[call-overload]
                f.seek(0, os.SEEK_END)
                f.write(b'{"after_truncate": 1}\n')
    elif kind == "delete":
        traj.unlink(missing_ok=True)
    elif kind == "pause":  # let the daemon get into its uploads (timing, not synchronisation)
        time.sleep(float(op[1]))  # type: ignore[arg-type]
    elif kind == "crash":
        if daemon.alive():
            daemon.kill()
    elif kind == "stop_server":
        (world.s3 if op[1] == "s3" else world.gcs).stop()
        down.add(str(op[1]))
    elif kind == "restart":
        if op[1] == "daemon":
            if not daemon.alive():
                daemon.start()
        elif op[1] in down:
            (world.s3 if op[1] == "s3" else world.gcs).start(restart=True)
            down.discard(str(op[1]))


def _check(world: World, ops: list[tuple[object, ...]]) -> None:
    base = world.base / uuid.uuid4().hex[:8]
    base.mkdir()
    env = RelEnv(base, world.s3.endpoint_url, world.gcs.endpoint_url, f"t/property-{base.name}")
    env.add("s3", compact_idle_s=0.5)
    env.add("gcs")
    env.add("file")
    daemon = env.daemon(flush_interval_s=0.05, mirror_deletes=True, invalid_json_grace_s=1.0)
    down: set[str] = set()
    try:
        daemon.start()
        wait_started(daemon)
        for op in ops:
            _apply(op, env, daemon, world, down)
        for name in list(down):  # settle: every server back, the daemon running
            (world.s3 if name == "s3" else world.gcs).start(restart=True)
            down.discard(name)
        if not daemon.alive():
            daemon.start()
        wait_settled(env, timeout_s=90)
    finally:
        daemon.__exit__()
        env.close()
        for name in down:
            (world.s3 if name == "s3" else world.gcs).start(restart=True)
        shutil.rmtree(base, ignore_errors=True)


_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    "derandomize": True,
}


@settings(max_examples=3, **_COMMON)  # type: ignore[arg-type]
@given(ops=st.lists(_ops, min_size=4, max_size=12))
def test_random_operations_settle_to_the_expected_mirror(
    world: World, ops: list[tuple[object, ...]]
) -> None:
    """Any sequence of appends, JSON writes, truncations, deletes, crashes and outages settles to an exact mirror."""
    _check(world, ops)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("EVALSYNCD_LONG_PROPERTY"), reason="set EVALSYNCD_LONG_PROPERTY=1"
)
@settings(max_examples=int(os.environ.get("EVALSYNCD_LONG_PROPERTY") or 0) * 50 or 50, **_COMMON)  # type: ignore[arg-type]
@given(ops=st.lists(_ops, min_size=5, max_size=40))
def test_random_operations_settle_long(world: World, ops: list[tuple[object, ...]]) -> None:
    """The long variant: 50 examples per unit of EVALSYNCD_LONG_PROPERTY, sequences up to 40 operations."""
    _check(world, ops)
