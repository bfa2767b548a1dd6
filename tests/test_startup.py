"""What a short-lived reader and the daemon's start cost before their first useful request.

- ``S3Storage`` clients of one process share botocore's parsed service data (a reader
  opened again and again parses no JSON after the first), never settings or credentials;
- the server probe and the reaper of an S3 destination never import the GCS SDK;
- ``evalsyncd run`` keeps the cyclic garbage collector off until ``READY=1``, then
  freezes what start-up allocated;
- the tail shipper's "is this file's run finalized" check is a lookup per directory level;
- a run listing that finds no run catalog (the moment between the daemon's first tail
  object and its catalog, or ``use_catalog=False``) reads the ``metadata.json`` files
  pending in the tail log in one request, not one per run.

The figures these buy are measured in ``bench/backfill.py`` (``docs/benchmarks.md``
section 3), never timed here.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.loaders
import pytest
from botocore.loaders import JSONFileLoader

from evalsyncd.cli import _gc_held_until_ready
from evalsyncd.config import DestinationSettings, RetrySettings
from evalsyncd.errors import ServerBehaviourError
from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage import probe as probe_module
from evalsyncd.storage._bridge import run_sync
from evalsyncd.storage._loaded import is_gcs, is_s3
from evalsyncd.storage._s3session import create_loader, new_session, tls_free
from evalsyncd.storage.memory import MemoryStorage, memory_bucket
from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory, StoredTurn
from evalsyncd.sync import steps
from evalsyncd.sync.destination import Destination, DestinationState
from evalsyncd.sync.journal import Journal
from evalsyncd.sync.owner import Owner
from evalsyncd.sync.tailmode import TailShipper, _under_any
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server

S3_BUCKET = "evalsyncd-test"


@pytest.fixture
def json_files_parsed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The botocore data files parsed from now on (their paths), in order."""
    parsed: list[str] = []
    original = JSONFileLoader.load_file

    def counting(self: JSONFileLoader, file_path: str) -> Any:
        found = original(self, file_path)
        if found is not None:
            parsed.append(file_path)
        return found

    monkeypatch.setattr(JSONFileLoader, "load_file", counting)
    yield parsed


def test_a_reader_opened_again_parses_no_service_data(
    cloud_env: dict[str, str],
    s3_server: SeaweedS3Server,
    unique_prefix: str,
    json_files_parsed: list[str],
) -> None:
    """Two ``EvalStore`` readers on fresh ``S3Storage`` instances, one after the other, as
    ``evalsyncd runs ls`` run in a loop: the first may parse botocore's data files (if no
    client of this process did before), the second parses none, and both list the run."""
    writer = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
    with writer:
        EvalStore(writer).create_run("m", ["gsm8k"], run_id="r1")
    for _attempt in range(2):
        json_files_parsed.clear()
        reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
        try:
            assert [r.run_id for r in EvalStore(reader).list_runs()] == ["r1"]
        finally:
            reader.close()
    assert json_files_parsed == [], f"the second client parsed {json_files_parsed}"


def test_sessions_share_service_data_never_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each session reads its credentials and region from the environment as it is when
    its client opens (as ``S3Storage`` opens one); only the data loader is shared, one per
    ``AWS_DATA_PATH``."""

    async def opened() -> tuple[Any, str, str]:
        session = new_session()
        credentials = await session.get_credentials()
        assert credentials is not None
        return session, session.get_config_variable("region"), credentials.access_key

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    first, region, key = asyncio.run(opened())
    assert (region, key) == ("eu-west-1", "first-key")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-2")
    second, region, key = asyncio.run(opened())
    assert (region, key) == ("us-east-2", "second-key")
    assert first.get_component("data_loader") is second.get_component("data_loader")
    monkeypatch.setenv("AWS_DATA_PATH", "/nonexistent-evalsyncd-data-path")
    other = new_session()
    assert other.get_component("data_loader") is not first.get_component("data_loader")
    assert "/nonexistent-evalsyncd-data-path" in other.get_component("data_loader").search_paths


@pytest.mark.parametrize("type_name", ["service-2", "endpoint-rule-set-1", "paginators-1"])
def test_the_loader_answers_as_botocores_without_walking_every_service(
    type_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which services have data, and the data itself, are botocore's answers; a model
    load lists only its own service's directory (botocore lists about 430)."""
    reference = botocore.loaders.create_loader()
    for name in ("s3", "sts", "nope", "", "s3/2006-03-01", "..", ".", "S3"):
        try:
            expected: object = reference.load_service_model(name, type_name)
        except botocore.exceptions.BotoCoreError as exc:
            expected = (type(exc), str(exc))
        try:
            got: object = create_loader(None).load_service_model(name, type_name)
        except botocore.exceptions.BotoCoreError as exc:
            got = (type(exc), str(exc))
        assert got == expected, name
    listed: list[str] = []
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        listed.append(path)
        return real_listdir(path)

    monkeypatch.setattr(botocore.loaders.os, "listdir", listdir)
    loader = create_loader(None)
    assert loader.load_service_model("s3", type_name) == reference.load_service_model(
        "s3", type_name
    )
    assert all(os.path.basename(path) == "s3" for path in listed), listed
    with pytest.raises(botocore.exceptions.UnknownServiceError, match=r"'nope'.*s3"):
        loader.load_service_model("nope", type_name)
    names = loader.list_available_services(type_name)  # other callers: botocore's list
    assert type(names) is list and names == reference.list_available_services(type_name)


@pytest.mark.parametrize(
    ("name", "type_name"),
    [
        ("endpoints", None),
        ("s3", "service-2"),
        ("s3", "endpoint-rule-set-1"),
        ("s3", "paginators-1"),
    ],
)
def test_the_loader_parses_botocores_data_into_plain_dicts_in_their_order(
    name: str, type_name: str | None
) -> None:
    """The shared loader's data is botocore's, key for key and in botocore's order, held
    in plain dicts (parsed without ``OrderedDict``, two to three times faster): if
    botocore renamed the step that is overridden, the type would show it."""
    reference = botocore.loaders.create_loader()
    loader = create_loader(None)
    if type_name is None:
        expected, got = reference.load_data(name), loader.load_data(name)
    else:
        expected = reference.load_service_model(name, type_name)
        got = loader.load_service_model(name, type_name)
    assert json.dumps(got) == json.dumps(expected)  # same keys, values and order

    def containers(value: Any) -> Iterator[Any]:
        yield value
        children = value.values() if isinstance(value, dict) else value
        for child in children if isinstance(value, dict | list) else ():
            yield from containers(child)

    assert {type(c) for c in containers(got) if isinstance(c, dict)} == {dict}
    assert any(type(c) is OrderedDict for c in containers(expected))


def test_a_readers_client_builds_no_lean_put_path_and_loads_no_ca_bundle(
    cloud_env: dict[str, str],
    s3_server: SeaweedS3Server,
    unique_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that only reads never builds the lean ``PutObject`` path (it is opened by
    the first small ``PutObject``), and a client of a plain-HTTP endpoint loads no CA
    bundle (no request to it can use TLS), while the bundle it would load is unreadable."""
    monkeypatch.setenv("AWS_CA_BUNDLE", "/nonexistent/evalsyncd-ca.pem")
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as storage:
        assert storage.list_dir("") == []
        assert run_sync(storage._client()).lean is None
        storage.write("runs/r/metadata.json", b"{}")
        lean = run_sync(storage._client()).lean
        assert lean is not None and lean.fallbacks == 0
        assert storage.read("runs/r/metadata.json") == b"{}"


@pytest.mark.parametrize(
    ("url", "proxy", "no_proxy", "expected"),
    [
        ("http://127.0.0.1:8333", None, None, True),
        ("HTTP://minio.internal:9000", None, None, True),
        ("https://127.0.0.1:8333", None, None, False),
        (None, None, None, False),  # AWS itself: https
        ("http://minio.internal:9000", "http://proxy:3128", None, False),
        ("http://minio.internal:9000", "https://proxy:3128", None, False),
        ("http://minio.internal:9000", "http://proxy:3128", "minio.internal", True),
    ],
)
def test_a_client_needs_no_ca_bundle_only_without_tls_anywhere(
    monkeypatch: pytest.MonkeyPatch,
    url: str | None,
    proxy: str | None,
    no_proxy: str | None,
    expected: bool,
) -> None:
    """``tls_free``: a plain-HTTP endpoint that no proxy of the environment applies to
    (``HTTP_PROXY``, ``NO_PROXY``, as botocore reads them); an ``https://`` proxy in front
    of a plain endpoint is verified with the bundle."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy is not None:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    if no_proxy is not None:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    assert tls_free(url) is expected


def test_backend_checks_import_no_sdk(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """The daemon's start on an S3 destination (the server probe, then the reaper) in a
    fresh interpreter: both run against the server and the GCS SDK is never imported."""
    code = (
        "import asyncio, json, sys\n"
        "from evalsyncd.storage import S3Storage\n"
        "from evalsyncd.storage.probe import aadapt\n"
        "from evalsyncd.storage.reap import areap\n"
        "async def main():\n"
        f"    async with S3Storage({S3_BUCKET!r}, {unique_prefix!r},"
        f" endpoint_url={s3_server.endpoint_url!r}) as s:\n"
        "        report = await aadapt(s)\n"
        "        removed = await areap(s)\n"
        "    return report.usable, removed\n"
        "usable, removed = asyncio.run(main())\n"
        "print(json.dumps({'usable': usable, 'removed': removed,\n"
        "    'gcs': sorted(m for m in sys.modules if m.startswith(('gcloud', 'evalsyncd.storage.gcs')))}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"usable": True, "removed": 0, "gcs": []}


def test_backend_checks_name_the_backend() -> None:
    """``is_s3``/``is_gcs`` answer as ``isinstance`` does, for the backends and others."""
    s3 = S3Storage("bucket", "p", endpoint_url="http://127.0.0.1:1")
    gcs = GCSStorage("bucket", "p")
    memory = MemoryStorage("bucket", "p")
    assert (is_s3(s3), is_gcs(s3)) == (True, False)
    assert (is_s3(gcs), is_gcs(gcs)) == (False, True)
    assert (is_s3(memory), is_gcs(memory)) == (False, False)
    assert (is_s3(None), is_gcs("gs://bucket/p")) == (False, False)


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The collector's state as it was, whatever the test did."""
    was = gc.isenabled()
    try:
        yield
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
        else:
            gc.disable()


@pytest.mark.usefixtures("gc_restored")
def test_the_collector_waits_for_ready_then_skips_the_start_up() -> None:
    """Inside the block the collector is off; ``ready()`` freezes what exists (the
    permanent generation is no longer empty) and turns it on; leaving turns it on in any
    case, and a second ``ready()`` changes nothing."""
    gc.enable()
    gc.unfreeze()
    with _gc_held_until_ready() as ready:
        assert not gc.isenabled()
        ready()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        ready()
        assert gc.get_freeze_count() == frozen
    assert gc.isenabled()
    with _gc_held_until_ready():
        assert not gc.isenabled()  # never READY (a failed start): on again at exit
    assert gc.isenabled()


@pytest.mark.usefixtures("gc_restored")
def test_a_collector_off_before_stays_off() -> None:
    """A process that turned the collector off itself keeps it off, and nothing is frozen."""
    gc.disable()
    gc.unfreeze()
    with _gc_held_until_ready() as ready:
        ready()
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    assert not gc.isenabled()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("runs/a/gsm8k/trajectories.jsonl", True),
        ("runs/a/result.json", True),
        ("runs/ab/metadata.json", False),  # a run whose id extends a finalized one's
        ("runs/b/x/y.json", True),
        ("runs/b/xy.json", False),
        ("runs/a", False),  # the directory itself is no file below it
        ("runs.jsonl", False),
        ("", False),
    ],
)
def test_a_file_is_in_a_finalized_run_by_its_directories(path: str, expected: bool) -> None:
    """``_under_any`` answers as "starts with one of the directories" (each ending in
    ``/``) does, by looking up each directory level of the path."""
    dirs = {"runs/a/", "runs/b/x/"}
    assert _under_any(path, dirs) is expected
    assert _under_any(path, dirs) is any(path.startswith(d) for d in dirs)


def _finalized_runs(root: Path, runs: int) -> None:
    store = EvalStore(root)
    for i in range(runs):
        run_id = f"step{i:04d}_20240101_000000_{i:06x}"
        store.create_run("m", ["gsm8k"], checkpoint_name=f"step{i}", run_id=run_id)
        turn = StoredTurn(role="assistant", content="A" * 2000, token_count=1)
        store.write_trajectory(
            run_id, "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k", turns=[turn])
        )
        result = BenchmarkResult(name="gsm8k", score=0.5, num_examples=1, num_correct=1)
        store.write_result(run_id, result)
        store.write_summary(run_id, {"gsm8k": result})
        store.finalize_run(run_id)


def test_a_listing_without_catalog_reads_pending_runs_in_one_request(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str, tmp_path: Path
) -> None:
    """The daemon's first pass over 20 finalized runs leaves every file in one tail object;
    a reader that does not use the run catalog lists ``runs/`` through the tail log, then
    finds every ``metadata.json`` pending in the tail and fetches their pieces in one
    ranged GET (not 20): the same runs as the catalog's reader, in 4 requests."""
    root = tmp_path / "root"
    _finalized_runs(root, 20)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fields = {"name": "s3", "url": f"s3://{S3_BUCKET}/{unique_prefix}", "max_main_lag_s": 60.0}
    settings = DestinationSettings.model_construct(**fields)  # type: ignore[arg-type]

    async def first_pass() -> None:
        storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
        async with storage:
            with Journal(tmp_path / "j.sqlite3", root) as journal:
                d = Destination(settings, storage, journal, root, flush_interval_s=0.01)
                for path in files:
                    d.mark(path)
                assert await d.run_pass()
                assert d.shipper.behind == len(files)  # no main object yet: all in the tail

    asyncio.run(first_pass())
    with (
        CountingProxy("127.0.0.1", s3_server.port) as proxy,
        S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url) as storage,
    ):
        with_catalog = [r.to_dict() for r in EvalStore(storage).list_runs()]
        fresh = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url)
        try:
            proxy.reset()
            without = [r.to_dict() for r in EvalStore(fresh, use_catalog=False).list_runs()]
            cost = proxy.requests
        finally:
            fresh.close()
    assert len(without) == 20 and without == with_catalog
    # LIST runs/, LIST .evalsyncd/tail/, GET the tail header, GET the pieces of every
    # metadata.json (side by side in the tail object's body)
    assert cost == 4, cost


# -- the server check and the first pass --------------------------------------------------


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _claiming(storage: MemoryStorage, journal: Journal, root: Path, **fields: Any) -> Destination:
    """A destination on ``storage`` that claims its prefix, as the daemon's does, with every
    file under ``root`` marked."""
    fields = {"name": "mem", "url": storage.url(), "max_main_lag_s": 60.0, **fields}
    settings = DestinationSettings.model_construct(**fields)
    owner = Owner(storage, journal.writer_id(), "mem")
    d = Destination(settings, storage, journal, root, flush_interval_s=0.01, owner=owner)
    for path in _files(root):
        d.mark(path)
    return d


def _recorded(storage: MemoryStorage, events: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Record in ``events``, in order, each file the tail shipper stages (``plan <path>``)
    and each write ``storage`` is asked for (``write <key or path> <bytes>``)."""
    plan = TailShipper.plan

    async def planned(self: TailShipper, path: str, *args: Any) -> Any:
        events.append(f"plan {path}")
        return await plan(self, path, *args)

    monkeypatch.setattr(TailShipper, "plan", planned)
    for name in ("awrite", "aappend", "aremove", "_internal_put"):
        method = getattr(storage, name)

        def recording(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            data = next((a for a in args if isinstance(a, bytes)), b"")
            events.append(f"write {args[0]} {len(data)}")
            return _method(*args, **kwargs)

        monkeypatch.setattr(storage, name, recording)


async def _until_parked(d: Destination) -> None:
    """Run ``d`` until it parks (5 s at most), then stop it and wait for its last pass."""
    task = asyncio.create_task(d.run())
    for _ in range(500):
        if d.state is DestinationState.PARKED:
            break
        await asyncio.sleep(0.01)
    d.stop()
    await task


def _until_listed(
    d: Destination, storage: MemoryStorage, runs: int, first: Callable[[], bool] = lambda: True
) -> Any:
    """Run ``d`` until ``first()`` holds, then until a fresh reader of ``storage`` (whose
    requests meet the bucket's faults too) lists ``runs`` runs; then stop it."""

    async def run() -> None:
        task = asyncio.create_task(d.run())
        for _ in range(600):
            if first():
                break
            await asyncio.sleep(0.01)
        reader = MemoryStorage(storage.bucket, storage.prefix)
        for _ in range(600):
            if len(await EvalStore(reader).alist_runs()) == runs:
                break
            await asyncio.sleep(0.01)
        d.stop()
        await task

    return run()


def test_the_first_pass_stages_while_the_claim_runs_and_writes_after_it(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that takes 0.3 s per request (read, create, read back): the first pass reads
    the tail log and stages every file meanwhile, and the first write of all is the claim;
    then one tail object makes every run listable."""
    root = tmp_path / "root"
    _finalized_runs(root, 5)
    files = _files(root)
    events: list[str] = []
    _recorded(memory_storage, events, monkeypatch)
    memory_storage.faults.delay("internal_get", 0.3)  # the claim's reads (a fresh prefix)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_listed(d, memory_storage, 5)
            assert d.stats.failures == {}

    asyncio.run(scenario())
    writes = [e for e in events if e.startswith("write ")]
    assert writes[0].split()[1].endswith("/.evalsyncd/owner.json"), writes
    staged = {e.removeprefix("plan ") for e in events[: events.index(writes[0])]}
    assert staged == set(files)  # all staged before the claim was even created
    assert "/.evalsyncd/tail/" in writes[1].split()[1], writes


_CHECKSUMS_REFUSED = ServerBehaviourError(
    "s3://b/p: the server lacks checksums (400 InvalidRequest)",
    url="s3://b/p",
    feature="checksums",
    answer="400 InvalidRequest",
)


def _slow_probe(
    events: list[str], monkeypatch: pytest.MonkeyPatch, error: Exception | None
) -> None:
    """The server probe takes 0.3 s and records ``probe start`` and ``probe end`` in
    ``events`` (on a MemoryStorage the real one has nothing to probe); then raises
    ``error``, if given."""

    async def probing(storage: Any) -> None:
        events.append("probe start")
        await asyncio.sleep(0.3)
        events.append("probe end")
        if error is not None:
            raise error

    monkeypatch.setattr(probe_module, "aadapt", probing)


def test_the_first_tail_object_waits_for_the_claim_and_objects_for_the_probe(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe that takes 0.3 s: the first tail object goes out once the prefix is claimed,
    before the probe starts (its requests would slow the upload readers wait for), and
    every run is listed through it; no object of a file is written before the probe
    passed, not even a file big enough to go straight to its object."""
    root = tmp_path / "root"
    _finalized_runs(root, 5)
    (root / "big.json").write_text(json.dumps({"x": "y" * 100_000}))  # sent whole, not staged
    events: list[str] = []
    _recorded(memory_storage, events, monkeypatch)
    _slow_probe(events, monkeypatch, None)
    main_written = lambda: any(e.startswith("write runs/") for e in events)  # noqa: E731

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_listed(d, memory_storage, 5, first=main_written)
            assert d.stats.failures == {}
            assert d.state is DestinationState.HEALTHY

    asyncio.run(scenario())
    writes = [e for e in events if e.startswith(("write ", "probe "))]
    assert writes[0].split()[1].endswith("/.evalsyncd/owner.json"), writes
    tail = next(i for i, w in enumerate(writes) if "/.evalsyncd/tail/" in w)
    started, ended = writes.index("probe start"), writes.index("probe end")
    assert 0 < tail < started < ended, writes  # the tail object did not wait, nor compete
    assert not [w for w in writes[:ended] if w.startswith(("write runs/", "write big"))], writes
    assert [w for w in writes[ended:] if w.startswith("write runs/")], writes
    assert [w for w in writes[ended:] if w.startswith("write big.json")], writes


def test_the_run_catalog_of_the_first_pass_goes_out_while_the_probe_runs(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first pass that stages every file: its tail object, then the run catalog that
    vouches for it, wait for the claim alone; the probe starts after them, and the pass
    ends with its verdict (the destination is healthy only then)."""
    root = tmp_path / "root"
    _finalized_runs(root, 5)
    events: list[str] = []
    _recorded(memory_storage, events, monkeypatch)
    _slow_probe(events, monkeypatch, None)
    put = memory_storage._internal_put

    async def slow_tail_put(key: str, *args: Any, **kwargs: Any) -> Any:
        tail = "/.evalsyncd/tail/" in key
        if tail:
            await asyncio.sleep(0.05)  # an upload that takes a while
        done = await put(key, *args, **kwargs)
        if tail:
            events.append("tail written")
        return done

    monkeypatch.setattr(memory_storage, "_internal_put", slow_tail_put)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_listed(d, memory_storage, 5, first=lambda: "probe end" in events)
            assert d.stats.failures == {}
            assert d.state is DestinationState.HEALTHY

    asyncio.run(scenario())
    writes = [e for e in events if e.startswith(("write ", "probe ", "tail "))]
    tail = writes.index("tail written")
    catalog = next(i for i, w in enumerate(writes) if "/.evalsyncd/catalog.json " in w)
    started, ended = writes.index("probe start"), writes.index("probe end")
    assert tail < catalog < started < ended, writes
    assert not [w for w in writes[:ended] if w.startswith("write runs")], writes


def test_a_probe_that_finds_the_server_unusable_after_the_first_tail_object_parks(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe finds a required feature missing while the first tail object uploads: the
    destination parks with the probe's error, and no object of a file is written, not
    even by the pass a stop runs."""
    root = tmp_path / "root"
    _finalized_runs(root, 3)
    events: list[str] = []
    _recorded(memory_storage, events, monkeypatch)
    _slow_probe(events, monkeypatch, _CHECKSUMS_REFUSED)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_parked(d)  # the pass in flight, and the stop's, end meanwhile
            assert d.state is DestinationState.PARKED
            assert d.last_error is not None and "lacks checksums" in d.last_error
            assert journal.destinations()["mem"].state == "parked"

    asyncio.run(scenario())
    assert "probe end" in events
    assert not [e for e in events if e.startswith("write runs/")], events


def test_a_pass_that_wrote_a_tail_object_while_the_probe_failed_is_no_success(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe fails while the first pass's tail object is still uploading (no run in
    it, so no catalog to publish after it): the pass ends with the probe's error, and the
    destination never reads ``healthy`` after it parked."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "runs.jsonl").write_text('{"run_id": "r1"}\n')
    events: list[str] = []
    _slow_probe(events, monkeypatch, _CHECKSUMS_REFUSED)
    memory_storage.faults.delay("internal_create", 0.6)  # the claim, then the tail object
    states: list[str] = []
    passes: list[bool] = []
    transition, run_pass = Destination._transition, Destination.run_pass

    def recording(self: Destination, new: DestinationState, reason: str | None = None) -> None:
        states.append(new.value)
        transition(self, new, reason)

    async def counted(self: Destination) -> bool:
        passes.append(await run_pass(self))
        return passes[-1]

    monkeypatch.setattr(Destination, "_transition", recording)
    monkeypatch.setattr(Destination, "run_pass", counted)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            task = asyncio.create_task(d.run())
            for _ in range(500):
                if passes:
                    break
                await asyncio.sleep(0.01)
            d.stop()
            await task
            assert d.state is DestinationState.PARKED
            assert journal.destinations()["mem"].state == "parked"

    asyncio.run(scenario())
    assert passes[0] is False, passes  # the first pass: its tail object sent, then the verdict
    assert "probe end" in events
    assert "parked" in states and "healthy" not in states[states.index("parked") :], states
    assert any("/.evalsyncd/tail/" in key for key in memory_bucket(memory_storage.bucket).objects)


def test_an_idle_start_probes_and_parks_on_an_unusable_server(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing to send (an empty root, or a restart with everything mirrored): no write
    asks for the probe, which runs all the same soon after the claim, and a server it
    finds unusable parks the destination (``status`` exits 1)."""
    root = tmp_path / "root"
    root.mkdir()
    events: list[str] = []
    _slow_probe(events, monkeypatch, _CHECKSUMS_REFUSED)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_parked(d)
            assert d.state is DestinationState.PARKED
            assert journal.destinations()["mem"].state == "parked"

    asyncio.run(scenario())
    assert events == ["probe start", "probe end"]


def test_a_start_never_records_healthy_before_its_probe_passed(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pass sends its tail object while the probe runs (0.3 s), then the probe
    finds the server unusable: what ``status`` reads goes to ``parked``, never through
    ``healthy`` (the pass waits for the check's verdict)."""
    root = tmp_path / "root"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "a.jsonl").write_text('{"a": 1}\n')
    events: list[str] = []
    _slow_probe(events, monkeypatch, _CHECKSUMS_REFUSED)
    recorded: list[str] = []
    record = Journal.set_destination_state

    def recording(self: Journal, name: str, state: str, *args: Any, **kwargs: Any) -> Any:
        recorded.append(state)
        return record(self, name, state, *args, **kwargs)

    monkeypatch.setattr(Journal, "set_destination_state", recording)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_parked(d)
            assert journal.destinations()["mem"].state == "parked"

    asyncio.run(scenario())
    assert "parked" in recorded and "healthy" not in recorded, recorded
    assert any("/.evalsyncd/tail/" in k for k in memory_bucket(memory_storage.bucket).objects)


def test_a_parked_destination_stays_recorded_parked_until_its_server_check_passes(
    memory_storage: MemoryStorage, tmp_path: Path
) -> None:
    """A daemon (or ``sync --once``) that starts a destination recorded ``parked`` records
    nothing for it until its first outcome: ``status`` must not read ``healthy`` while
    nothing was tried (a ``sync --once`` whose time went to another destination). The
    server check that passes records it healthy."""
    root = tmp_path / "root"
    _finalized_runs(root, 1)
    with Journal(tmp_path / "j.sqlite3", root) as journal:
        journal.set_destination_state("mem", "parked", error="PrefixOwnedError: host b")
        d = _claiming(memory_storage, journal, root)
        assert journal.destinations()["mem"].state == "parked"

        async def checked() -> None:
            assert await d._checked() is None

        asyncio.run(checked())
        record = journal.destinations()["mem"]
        assert (record.state, record.last_error) == ("healthy", "PrefixOwnedError: host b")


def test_a_failed_claim_fails_the_first_pass_once_and_nothing_is_staged_twice(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim's first read fails (an outage at start) while the first pass stages: the
    pass writes nothing and the failure is counted once (the check's, which the pass waited
    for); the check runs again after the backoff, and the files the failed pass staged go
    out once, in one tail object: every file reads back as it is on disk."""
    root = tmp_path / "root"
    _finalized_runs(root, 5)
    files = _files(root)
    events: list[str] = []
    _recorded(memory_storage, events, monkeypatch)
    memory_storage.faults.delay("internal_get", 0.1, times=1)  # staging starts first
    memory_storage.faults.fail("internal_get", times=1)
    retry = RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.02)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root, retry=retry)
            await _until_listed(d, memory_storage, 5, first=lambda: bool(d.stats.failures))
            assert d.stats.failures == {"TransientStorageError": 1}

    asyncio.run(scenario())
    writes = [e for e in events if e.startswith("write ")]
    assert writes[0].split()[1].endswith("/.evalsyncd/owner.json"), writes
    assert sum(e.startswith("plan ") for e in events[: events.index(writes[0])]) >= len(files)
    # the first tail object holds each file's bytes once (what the failed pass staged was
    # dropped), plus its header
    tails = [int(w.split()[2]) for w in writes if "/.evalsyncd/tail/" in w.split()[1]]
    local = sum((root / path).stat().st_size for path in files)
    assert local < tails[0] < 1.5 * local, (tails, local)
    reader = MemoryStorage(memory_storage.bucket, memory_storage.prefix)
    for path in files:
        assert reader.read(path) == (root / path).read_bytes(), path


def test_another_daemons_prefix_gets_nothing_from_a_first_pass_that_staged(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another daemon's claim on the prefix: the first pass stages (the check runs
    meanwhile), then parks with ``PrefixOwnedError``; nothing is written."""
    root = tmp_path / "root"
    _finalized_runs(root, 3)
    asyncio.run(Owner(memory_storage, "another-writer", "mem").ensure())
    events: list[str] = []
    _recorded(memory_storage, events, monkeypatch)
    memory_storage.faults.delay("internal_get", 0.2)  # the claim's read: staging goes first

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root)
            await _until_parked(d)
            assert d.state is DestinationState.PARKED
            assert d.last_error is not None and d.last_error.startswith("PrefixOwnedError")

    asyncio.run(scenario())
    assert not [e for e in events if e.startswith("write ")], events
    assert any(e.startswith("plan ") for e in events)


def test_an_idle_daemon_on_another_daemons_prefix_parks_and_reaps_nothing(
    memory_storage: MemoryStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing to send (an empty root) on a prefix another daemon claimed: the server check
    itself parks the destination with ``PrefixOwnedError`` (no pass has to write first),
    and the periodic reap of failed cleanups' leftovers never runs on that prefix."""
    root = tmp_path / "root"
    root.mkdir()
    asyncio.run(Owner(memory_storage, "another-writer", "mem").ensure())
    reaped: list[str] = []
    reap = steps.areap

    async def recording(storage: Any, **kwargs: Any) -> int:
        reaped.append(storage.url())
        return await reap(storage, **kwargs)

    monkeypatch.setattr(steps, "areap", recording)

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            d = _claiming(memory_storage, journal, root, reap_interval_s=0.05, reap_min_age_s=1.0)
            task = asyncio.create_task(d.run())
            for _ in range(500):
                if d.state is DestinationState.PARKED:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # reaps would be due meanwhile
            d.stop()
            await task
            assert d.state is DestinationState.PARKED
            assert d.last_error is not None and d.last_error.startswith("PrefixOwnedError")

    asyncio.run(scenario())
    assert reaped == []
