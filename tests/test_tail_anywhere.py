"""The tail log found from any prefix: a reader below a destination's prefix, at it, or above it
(the fleet prefix) sees the same bytes, at a bounded and cached cost.

Daemon tests run against SeaweedFS and fake-gcs-server with main objects held back (the tail
log alone holds the new bytes); the cost and search-order tests run on ``MemoryStorage``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage._tailfind import search_levels
from evalsyncd.storage.memory import MemoryStorage, drop_bucket
from evalsyncd.storage.tail import TailWriter
from evalsyncd.store import EvalStore, StoredTrajectory
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.helpers import wait_for
from tests.reliability import RelEnv

# -- the search order (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("root", "directory", "depth", "levels"),
    [
        ("host", "host", 1, ["host", ""]),
        ("host/train", "host/train/runs/r", 1, ["host/train", "host", ""]),  # a store's runs/
        ("host/train", "host/train/eval/r", 1, ["host/train", "host", "", "host/train/eval"]),
        ("fleet", "fleet/h1/runs", 1, ["fleet", "", "fleet/h1"]),
        ("fleet", "fleet/h1/runs", 0, ["fleet", ""]),
        ("", "a/b/c", 2, ["", "a", "a/b"]),
        ("p", "p/.evalsyncd/tail", 3, ["p", ""]),
    ],
)
def test_search_levels_own_prefix_then_above_then_below(
    root: str, directory: str, depth: int, levels: list[str]
) -> None:
    """A storage probes its own prefix, the prefixes above it (nearest first), then `depth`
    levels below it, never inside a `.evalsyncd` area or a store's `runs/`."""
    assert search_levels(root, directory, depth) == levels


# -- MemoryStorage: what each reader sees, and what it costs ---------------------------


@pytest.fixture
def bucket() -> Iterator[str]:
    name = f"anywhere-{uuid.uuid4().hex}"
    yield name
    drop_bucket(name)


async def _flush_to_tail(dest: MemoryStorage) -> None:
    """A destination at ``fleet/host``: main objects hold old bytes, the tail the new ones."""
    await dest.awrite("train/runs.jsonl", b'{"a": 1}\n')
    stat = await dest.astat("train/runs.jsonl")
    assert stat is not None
    writer = TailWriter(dest, "w1")
    await writer.open()
    writer.stage_append(
        "train/runs.jsonl", 9, b'{"b": 2}\n', base=9, main_version=stat.version, mtime=1.0
    )
    writer.stage_replace("train/new.json", b"{}", mtime=1.0)
    await writer.commit()


def test_readers_below_at_and_above_the_destination_see_the_same(bucket: str) -> None:
    """Readers rooted at the destination, below it, above it and at the bucket's root (with
    depth 2) agree on read, read_range, stat, exists and list_dir of tail-only bytes."""
    dest = MemoryStorage(bucket, "fleet/host")
    with dest:
        dest.read_tail = False
        asyncio.run(_flush_to_tail(dest))
    views = {
        "destination": (MemoryStorage(bucket, "fleet/host"), "train/"),
        "sub-prefix": (MemoryStorage(bucket, "fleet/host/train"), ""),
        "fleet": (MemoryStorage(bucket, "fleet"), "host/train/"),
        "bucket root": (MemoryStorage(bucket, ""), "fleet/host/train/"),
    }
    views["bucket root"][0].tail_search_depth = 2
    for name, (s, lead) in views.items():
        with s:
            assert s.read(f"{lead}runs.jsonl") == b'{"a": 1}\n{"b": 2}\n', name
            assert s.read_range(f"{lead}runs.jsonl", 9, 4) == b'{"b"', name
            st = s.stat(f"{lead}runs.jsonl")
            assert st is not None and st.size == 18, name
            assert s.exists(f"{lead}new.json") and s.read(f"{lead}new.json") == b"{}", name
            assert s.list_dir(lead) == ["new.json", "runs.jsonl"], name
            assert ".evalsyncd" not in s.list_dir(lead.rsplit("/", 2)[0] if lead else ""), name


def test_discovery_costs_one_listing_per_level_at_first_use(bucket: str) -> None:
    """A sub-prefix reader lists its own prefix's tail log and the one above once; further
    reads within the refresh interval cost no listing at all."""
    dest = MemoryStorage(bucket, "fleet/host")
    with dest:
        dest.read_tail = False
        asyncio.run(_flush_to_tail(dest))
    reader = MemoryStorage(bucket, "fleet/host/train")
    reader.tail_refresh_s = 60.0
    with reader:
        before = reader.faults.calls["list_keys"]
        for _ in range(5):
            assert reader.read("runs.jsonl").count(b"\n") == 2
            assert reader.stat("new.json") is not None
        # own prefix (no tail log), then fleet/host (found): two listings, once
        assert reader.faults.calls["list_keys"] - before == 2


def test_a_tail_less_fleet_costs_no_probe_per_run(bucket: str) -> None:
    """Without any tail log, reading every run of a host from the fleet prefix costs a fixed
    number of listings (the levels above and the host), not one per run directory."""
    fleet = MemoryStorage(bucket, "fleet")
    fleet.tail_refresh_s = 60.0
    with fleet:
        for i in range(20):
            fleet.write(f"host/runs/r{i}/metadata.json", b"{}")
        before = fleet.faults.calls["list_keys"]
        for i in range(20):
            assert fleet.read(f"host/runs/r{i}/metadata.json") == b"{}"
        assert fleet.faults.calls["list_keys"] - before <= 3


# -- the daemon, real servers ---------------------------------------------------------------


def _write_store(root: Path) -> tuple[str, bytes]:
    store = EvalStore(root / "train")
    run_id = store.create_run("model", ["gsm8k"], checkpoint_name="step1", run_id="r1")
    for i in range(3):
        store.write_trajectory(run_id, "gsm8k", StoredTrajectory(idx=i, benchmark="gsm8k"))
    key = "train/runs/r1/gsm8k/trajectories.jsonl"
    return key, (root / key).read_bytes()


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_sub_prefix_and_fleet_readers_see_a_flush_before_main_objects(
    rel: RelEnv, kind: str
) -> None:
    """Right after a flush (main objects held back), EvalStore at a sub-prefix and at the fleet
    prefix, and plain stat/list_dir/ranged reads there, see what the destination's reader sees."""
    dest = rel.add(kind, compact_idle_s=600.0, max_main_lag_s=600.0)
    assert isinstance(dest, S3Storage | GCSStorage)
    dest.tail_refresh_s = 0.0
    with rel.daemon(flush_interval_s=0.2):
        key, data = _write_store(rel.root)
        wait_for(lambda: dest.exists(key) and dest.read(key) == data, 30, what="the flush")
        # main objects hold nothing yet: plain readers miss the bytes; ours must not
        plain = type(dest)(dest.bucket, dest.prefix, endpoint_url=dest.endpoint_url)  # type: ignore[arg-type]
        plain.read_tail = False
        with plain:
            assert not plain.exists(key)
        bucket = S3_BUCKET if kind == "s3" else GCS_BUCKET
        sub = type(dest)(bucket, f"{dest.prefix}/train", endpoint_url=dest.endpoint_url)  # type: ignore[arg-type]
        fleet = type(dest)(bucket, rel.prefix, endpoint_url=dest.endpoint_url)  # type: ignore[arg-type]
        with sub, fleet:
            host = dest.prefix.rsplit("/", 1)[1]
            for s, lead in ((sub, ""), (fleet, f"{host}/train/")):
                rel_key = lead + key.removeprefix("train/")
                assert s.read(rel_key) == data
                assert s.read_range(rel_key, 5, 10) == data[5:15]
                st = s.stat(rel_key)
                assert st is not None and st.size == len(data)
                assert s.list_dir(f"{lead}runs") == ["r1"]
                assert s.list_dir(f"{lead}runs/r1/gsm8k") == ["trajectories.jsonl"]
            store = EvalStore(sub)
            assert [r.run_id for r in store.list_runs()] == ["r1"]
            assert [t.idx for t in store.read_trajectories("r1", "gsm8k")] == [0, 1, 2]
            raw = EvalStore(fleet, f"{host}/train")  # a store opened one level up, with a prefix
            assert [r.run_id for r in raw.list_runs()] == ["r1"]
