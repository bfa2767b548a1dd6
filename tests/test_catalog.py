"""The run catalog: its format (pure functions) and how ``EvalStore.list_runs`` uses it.

Store tests run once per backend (local, S3, GCS) against the real servers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from evalsyncd.catalog import (
    CATALOG_PATH,
    CatalogError,
    build_catalog,
    catalog_from_root,
    metadata_crc32c,
    parse_catalog,
)
from evalsyncd.errors import StorageError
from evalsyncd.storage import AnyStorage, LocalStorage, S3Storage
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.store import BenchmarkResult, EvalStore
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import S3_BUCKET

URL = "s3://b/p/.evalsyncd/catalog.json"


def make_runs(store: EvalStore, n: int, model: str = "m") -> list[str]:
    """``n`` finalized runs with two benchmarks, distinct timestamps."""
    ids = []
    for i in range(n):
        run_id = store.create_run(
            model, ["gsm8k", "math"], checkpoint_name=f"step{i}", run_id=f"run{i:03d}"
        )
        for b in ("gsm8k", "math"):
            store.write_result(
                run_id, BenchmarkResult(name=b, score=i / 10, num_examples=10, num_correct=i)
            )
        store.finalize_run(run_id)
        ids.append(run_id)
    return ids


def write_catalog(storage: AnyStorage, prefix: str = "") -> bytes:
    """Build the catalog from what the storage holds and write it (as the daemon will)."""
    entries = {}
    base = f"{prefix}/" if prefix else ""
    for name in storage.list_dir(f"{base}runs"):
        try:
            entries[name] = storage.read(f"{base}runs/{name}/metadata.json")
        except FileNotFoundError:
            continue
    data = build_catalog(entries)
    storage.write(f"{base}{CATALOG_PATH}", data)
    return data


# ── Format ─────────────────────────────────────────────────────────────────────


def test_build_parse_roundtrip_keeps_bytes_sizes_and_crc32c() -> None:
    """parse_catalog(build_catalog(x)) gives back every metadata.json byte for byte, intact."""
    entries = {
        "r1": b'{\n  "run_id": "r1",\n  "model_name": "caf\xc3\xa9"\n}',
        "r2": b"\xff\xfe not utf-8",
    }
    data = build_catalog(entries)
    assert data == build_catalog(dict(reversed(entries.items())))  # deterministic
    doc = json.loads(data)
    assert doc["format"] == "evalsyncd-catalog" and doc["version"] == 1
    assert "metadata_b64" in doc["runs"]["r2"]
    cat = parse_catalog(data, URL)
    assert {k: e.data for k, e in cat.entries.items()} == entries
    for run_id, raw in entries.items():
        entry = cat.get(run_id)
        assert entry is not None and entry.intact
        assert (entry.size, entry.crc32c) == (len(raw), metadata_crc32c(raw))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"{not json", "corrupt catalog"),
        (b"[]", "not an evalsyncd catalog"),
        (b'{"format": "evalsyncd-catalog", "version": 99, "runs": {}}', "version 99"),
        (b'{"format": "evalsyncd-catalog", "version": 1, "runs": []}', "'runs'"),
        (
            b'{"format": "evalsyncd-catalog", "version": 1, "runs": {"r1": {"size": 1}}}',
            "entry 'r1'",
        ),
    ],
)
def test_parse_catalog_errors_name_the_key(data: bytes, needle: str) -> None:
    """Each kind of corruption raises CatalogError naming the catalog's URL and the problem."""
    with pytest.raises(CatalogError) as info:
        parse_catalog(data, URL)
    assert URL in str(info.value) and needle in str(info.value)
    assert info.value.url == URL


def test_entry_that_does_not_match_its_crc_is_not_intact() -> None:
    """A tampered entry parses but is flagged, so readers read that run instead."""
    doc = json.loads(build_catalog({"r1": b'{"run_id": "r1"}'}))
    doc["runs"]["r1"]["metadata"] = '{"run_id": "r2"}'
    entry = parse_catalog(json.dumps(doc).encode(), URL).get("r1")
    assert entry is not None and not entry.intact


def test_catalog_from_root_takes_only_metadata_that_parses(tmp_path: Path) -> None:
    """catalog_from_root includes each parseable runs/*/metadata.json and skips the rest."""
    store = EvalStore(tmp_path)
    make_runs(store, 2)
    (tmp_path / "runs/broken").mkdir()
    (tmp_path / "runs/broken/metadata.json").write_bytes(b'{"run_id": "bro')
    (tmp_path / "runs/nometa").mkdir()
    cat = parse_catalog(catalog_from_root(tmp_path), "x")
    assert sorted(cat) == ["run000", "run001"]
    entry = cat.get("run000")
    assert entry is not None
    assert entry.data == (tmp_path / "runs/run000/metadata.json").read_bytes()
    assert parse_catalog(catalog_from_root(tmp_path / "absent"), "x").entries == {}


def test_catalog_module_imports_only_errors_and_storage() -> None:
    """evalsyncd.catalog loads no evalsyncd module but errors and storage (the daemon may use it)."""
    code = (
        "import sys, evalsyncd.catalog\n"
        "print(sorted(m for m in sys.modules if m.startswith('evalsyncd')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(eval(out.stdout))
    assert loaded <= {"evalsyncd", "evalsyncd.catalog", "evalsyncd.errors"} | {
        m for m in loaded if m.startswith("evalsyncd.storage")
    }


# ── The reader ─────────────────────────────────────────────────────────────────


async def _alist_and_close(store: EvalStore) -> list[Any]:
    """alist_runs on this loop, then close the client the storage opened for it."""
    try:
        return await store.alist_runs()
    finally:
        aclose = getattr(store.storage, "aclose", None)
        if aclose is not None:
            await aclose()


def _dicts(store: EvalStore) -> list[dict[str, object]]:
    return [m.to_dict() for m in store.list_runs()]


H = "h1"
"""Store prefix of the reader tests: S3Storage reserves .evalsyncd/ at its own root, so a
store one level down (as in a fleet) is how every backend reads the same catalog key."""


def test_list_runs_same_with_and_without_catalog(storage: AnyStorage) -> None:
    """list_runs/alist_runs return the same runs with a catalog, without one, and with it off."""
    store = EvalStore(storage, H)
    make_runs(store, 5)
    without = _dicts(store)
    write_catalog(storage, H)
    assert storage.exists(f"{H}/{CATALOG_PATH}")
    assert _dicts(store) == without
    assert _dicts(EvalStore(storage, H, use_catalog=False)) == without
    assert [m.to_dict() for m in asyncio.run(_alist_and_close(store))] == without
    assert [r["run_id"] for r in without] == [f"run{i:03d}" for i in reversed(range(5))]


def test_listing_is_the_truth_deleted_and_new_runs(storage: AnyStorage) -> None:
    """A run deleted since the catalog was written is not listed; a new one is read individually."""
    store = EvalStore(storage, H)
    make_runs(store, 3)
    write_catalog(storage, H)
    store.delete_run("run001")
    store.create_run("m", ["gsm8k"], run_id="run900")
    got = [m.run_id for m in store.list_runs()]
    assert sorted(got) == ["run000", "run002", "run900"]
    assert _dicts(store) == _dicts(EvalStore(storage, H, use_catalog=False))


def test_corrupt_catalog_falls_back_with_a_warning(
    storage: AnyStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A catalog that does not parse is ignored with a warning naming its key; answers unchanged."""
    store = EvalStore(storage, H)
    make_runs(store, 3)
    expected = _dicts(store)
    storage.write(f"{H}/{CATALOG_PATH}", b'{"format": "evalsyncd-catalog", "vers')
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        assert _dicts(store) == expected
    assert storage.url(f"{H}/{CATALOG_PATH}") in caplog.text and "corrupt catalog" in caplog.text


def test_tampered_entry_is_read_individually(
    local_storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose bytes do not match its CRC32C is ignored: the run's metadata.json is read."""
    store = EvalStore(local_storage)
    make_runs(store, 2)
    doc = json.loads(write_catalog(local_storage))
    doc["runs"]["run000"]["metadata"] = doc["runs"]["run000"]["metadata"].replace("step0", "evil")
    local_storage.write(CATALOG_PATH, json.dumps(doc).encode())
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        names = {m.run_id: m.checkpoint_name for m in store.list_runs()}
    assert names == {"run000": "step0", "run001": "step1"}
    assert "'run000' does not match" in caplog.text


def test_unparseable_metadata_in_catalog_is_skipped_like_the_file(
    local_storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    """A catalog entry holding metadata that does not parse is skipped with a warning naming the key."""
    store = EvalStore(local_storage)
    make_runs(store, 2)
    local_storage.write("runs/run001/metadata.json", b'{"run_id": ')
    write_catalog(local_storage)
    with caplog.at_level(logging.WARNING, logger="evalsyncd.store"):
        assert [m.run_id for m in store.list_runs()] == ["run000"]
    assert local_storage.url("runs/run001/metadata.json") in caplog.text


def test_catalog_makes_list_runs_two_requests_on_s3(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3 with a catalog, list_runs costs one listing, one look at the tail log and one
    catalog read, whatever the runs; this host has no tail log, so the first reader also looks
    once at each prefix above it (where a destination's tail log could be)."""
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        make_runs(EvalStore(direct, H), 12)
        write_catalog(direct, H)
    with (
        CountingProxy("127.0.0.1", s3_server.port) as proxy,
        S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url) as storage,
    ):
        storage.tail_refresh_s = 60.0  # the second listing reuses the tail log's index
        store = EvalStore(storage, H)
        proxy.reset()
        with_catalog = _dicts(store)
        cost = proxy.requests
        proxy.reset()
        without = _dicts(EvalStore(storage, H, use_catalog=False))
        assert with_catalog == without and len(without) == 12
        above = unique_prefix.count("/") + 2  # t/{test}, t, the bucket's root
        # LIST runs/, LIST .evalsyncd/tail/, GET the catalog; LIST the tail log of each level above
        assert cost == 3 + above, cost
        # a new store on the same storage: LIST runs/ and 12 GETs (what the first store
        # learned about tail logs is shared, and fresh for tail_refresh_s)
        assert proxy.requests == 13


def test_outage_with_catalog_raises_never_no_runs(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """With the server gone, list_runs raises a StorageError even though a catalog exists."""
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        make_runs(EvalStore(direct, H), 2)
        write_catalog(direct, H)
    proxy = CountingProxy("127.0.0.1", s3_server.port).start()
    url = proxy.url
    proxy.stop()  # nothing listens there any more
    storage = S3Storage(
        S3_BUCKET,
        unique_prefix,
        endpoint_url=url,
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
        max_attempts=1,
    )
    with storage, pytest.raises(StorageError):
        EvalStore(storage, H).list_runs()


def test_s3_store_at_its_root_reads_each_run_when_the_catalog_key_is_reserved(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """S3Storage reserves .evalsyncd/ at its root: a store there gives the same runs, read one by one."""
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as parent:
        make_runs(EvalStore(parent, H), 3)
        write_catalog(parent, H)
        expected = _dicts(EvalStore(parent, H))
    with S3Storage(S3_BUCKET, f"{unique_prefix}/{H}", endpoint_url=s3_server.endpoint_url) as s:
        assert _dicts(EvalStore(s)) == expected


def test_storage_offering_read_internal_is_asked_for_the_catalog(tmp_path: Path) -> None:
    """A storage with read_internal/aread_internal serves the catalog through it at its root."""

    asked: list[str] = []

    class Internal(LocalStorage):
        def read_internal(self, name: str) -> bytes:
            asked.append(name)
            return self.read(f".evalsyncd/{name}")

        async def aread_internal(self, name: str) -> bytes:
            return self.read_internal(name)

    storage = Internal(tmp_path / "s")
    make_runs(EvalStore(storage), 2)
    write_catalog(storage)
    assert [m.run_id for m in EvalStore(storage).list_runs()] == ["run001", "run000"]
    assert asked == ["catalog.json"]


def test_a_local_metadata_nested_too_deeply_is_left_out_of_the_catalog(tmp_path: Path) -> None:
    """The daemon's catalog of a root leaves out a metadata.json nested deeper than the
    parser's recursion limit (readers read that run alone) instead of raising RecursionError."""
    from evalsyncd.catalog import catalog_from_root

    store = EvalStore(tmp_path)
    store.create_run("m", ["gsm8k"], run_id="good")
    (tmp_path / "runs/deep").mkdir()
    (tmp_path / "runs/deep/metadata.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    assert set(json.loads(catalog_from_root(tmp_path))["runs"]) == {"good"}


# ── The tail log vouches for the catalog (rule 6) ─────────────────────────────────


def test_vouched_by_needs_the_same_writer_and_no_later_mark() -> None:
    """A catalog built at (writer, seq) stands in for the listing only under a newest tail
    header of that writer whose catalog mark is at most that seq."""
    from evalsyncd.catalog import CATALOG_MARK

    catalog = parse_catalog(build_catalog({"r": b"{}"}, tail=("w", 7)), "u")
    assert catalog.tail == ("w", 7)
    assert catalog.vouched_by("w", 9, {CATALOG_MARK: 7})
    assert catalog.vouched_by("w", 9, {})  # no metadata ever changed through this tail
    assert not catalog.vouched_by("w", 9, {CATALOG_MARK: 8})  # a run changed since
    assert not catalog.vouched_by("other", 9, {})  # another writer's tail log
    assert not catalog.vouched_by("", -1, {})  # no tail log
    plain = parse_catalog(build_catalog({"r": b"{}"}), "u")
    assert plain.tail is None and not plain.vouched_by("w", 9, {})
    for bad in ({"writer": "", "seq": 1}, {"writer": "w", "seq": -1}, {"writer": "w"}, [1]):
        doc = json.loads(build_catalog({"r": b"{}"}))
        doc["tail"] = bad
        assert parse_catalog(json.dumps(doc).encode(), "u").tail is None  # ignored, not fatal


def test_a_vouched_catalog_replaces_the_runs_listing_and_tail_runs_are_added(
    memory_storage: MemoryStorage,
) -> None:
    """With a catalog the tail log vouches for, list_runs reads the tail index and the catalog
    and lists no directory; a run staged in the tail since is listed (read from the tail); a
    later mark or another writer falls back to the listing, with the same answer."""
    from evalsyncd.catalog import CATALOG_MARK, CATALOG_NAME
    from evalsyncd.storage.tail import TailWriter

    host = memory_storage.child("host")
    ids = make_runs(EvalStore(host), 3)
    metadata = {i: host.read(f"runs/{i}/metadata.json") for i in ids}
    scratch = EvalStore(memory_storage.child("scratch"))
    scratch.create_run("m", ["g"], checkpoint_name="late", run_id="late")
    late = scratch.storage.read("runs/late/metadata.json")

    async def commit(mark: bool, path: str | None = None, data: bytes = b"") -> int:
        w = TailWriter(host, "w1")
        await w.open()
        if path is not None:
            w.stage_replace(path, data, mtime=1.0)
        if mark:
            w.mark(CATALOG_MARK)
        return (await w.commit()).seq

    seq = asyncio.run(commit(True))
    host.write_internal(CATALOG_NAME, build_catalog(metadata, tail=("w1", seq)))
    faults = memory_storage.faults

    def listing() -> tuple[list[str], int]:
        fresh = MemoryStorage(memory_storage.bucket, f"{memory_storage.prefix}/host")  # no cache
        faults.calls.clear()
        runs = [r.run_id for r in EvalStore(fresh).list_runs()]
        return sorted(runs), faults.calls["list_dir"]

    assert listing() == (sorted(ids), 0)
    asyncio.run(commit(True, "runs/late/metadata.json", late))  # staged since: a later mark
    assert listing() == (sorted([*ids, "late"]), 1)
    host.write_internal(CATALOG_NAME, build_catalog(metadata, tail=("w1", seq + 1)))
    assert listing() == (sorted([*ids, "late"]), 0)  # vouched; "late" from the tail
    host.write_internal(CATALOG_NAME, build_catalog(metadata, tail=("w0", seq + 1)))
    assert listing() == (sorted([*ids, "late"]), 1)  # another writer's catalog
    host.write_internal(CATALOG_NAME, build_catalog(metadata))
    assert listing() == (sorted([*ids, "late"]), 1)  # not known complete


def test_the_daemon_vouches_only_for_a_complete_catalog(
    tmp_path: Path, memory_storage: MemoryStorage
) -> None:
    """The daemon's catalog records its tail log's writer and seq only when every mirrored
    metadata.json is in it as the journal acknowledged it; a metadata.json changed since, one
    sent straight to its main object, and one deleted with mirror_deletes all keep readers
    right: vouched (no listing of runs/) or listing runs/."""
    from evalsyncd.catalog import CATALOG_NAME
    from evalsyncd.config import DestinationSettings
    from evalsyncd.sync.destination import Destination
    from evalsyncd.sync.journal import Journal

    root = tmp_path / "root"
    ids = make_runs(EvalStore(root), 3)
    settings = DestinationSettings(name="m", url="s3://b/p", direct_append_bytes=4096)

    def listing() -> tuple[list[str], int, bool]:
        fresh = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
        memory_storage.faults.calls.clear()
        runs = sorted(r.run_id for r in EvalStore(fresh).list_runs())
        tail = parse_catalog(memory_storage.read_internal(CATALOG_NAME), "u").tail
        return runs, memory_storage.faults.calls["list_dir"], tail is not None

    async def passes(*paths: str) -> None:
        for p in paths:
            dest.mark(p)
        assert await dest.run_pass()

    with Journal(tmp_path / "j.sqlite3", root) as journal:
        dest = Destination(settings, memory_storage, journal, root, flush_interval_s=0.01,
                           mirror_deletes=True)  # fmt: skip
        everything = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        asyncio.run(passes(*everything))
        assert listing() == (ids, 0, True)
        meta = root / f"runs/{ids[0]}/metadata.json"
        changed = json.loads(meta.read_bytes())
        changed["model_name"] = "m2"
        meta.write_text(json.dumps(changed))  # changed, not sent yet
        asyncio.run(passes(f"runs/{ids[1]}/metadata.json"))
        assert listing() == (ids, 1, False)  # incomplete: readers list runs/
        asyncio.run(passes(f"runs/{ids[0]}/metadata.json"))
        assert listing() == (ids, 0, True)
        fresh = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
        assert EvalStore(fresh).read_run(ids[0]).model_name == "m2"
        big = root / f"runs/{ids[1]}/metadata.json"  # past direct_append_bytes: straight to main
        doc = json.loads(big.read_bytes())
        doc["config"] = {"pad": "x" * 5000}
        big.write_text(json.dumps(doc))
        asyncio.run(passes(f"runs/{ids[1]}/metadata.json"))
        assert listing() == (ids, 0, True)
        gone = ids[2]
        for p in sorted((root / "runs" / gone).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "runs" / gone).rmdir()
        asyncio.run(passes(*[p for p in everything if p.startswith(f"runs/{gone}/")]))
        assert listing() == (ids[:2], 0, True)
