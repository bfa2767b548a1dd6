"""Fleet reads (``evalsyncd.fleet``), ``runs ls|show`` on fleets, ``restore``, and the CLI's fast start.

Backend tests run once per backend (local, S3, GCS) against the real servers.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import evalsyncd
from evalsyncd.errors import AccessDeniedError
from evalsyncd.fleet import AmbiguousRunError, Fleet
from evalsyncd.storage import AnyStorage, S3Storage
from evalsyncd.store import EvalStore, StoredTrajectory
from evalsyncd.testing.proxy import CountingProxy
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import S3_BUCKET
from tests.faultproxy import FaultProxy, Rule
from tests.opshelpers import evalsyncd as run_cli
from tests.test_catalog import make_runs, write_catalog


def make_fleet(storage: AnyStorage, hosts: dict[str, int], *, catalog: bool = True) -> None:
    """Hosts under the storage's root, each with ``n`` runs (ids ``{host}-run00i``)."""
    for host, n in hosts.items():
        store = EvalStore(storage, host)
        for i in range(n):
            run_id = store.create_run(
                f"model-{host}", ["gsm8k"], checkpoint_name=f"step{i}", run_id=f"{host}-run{i:03d}"
            )
            store.write_trajectory(run_id, "gsm8k", StoredTrajectory(idx=0, benchmark="gsm8k"))
        if catalog:
            write_catalog(storage, host)


# ── The Python API ─────────────────────────────────────────────────────────────


def test_fleet_lists_every_host_tagged(storage: AnyStorage) -> None:
    """Fleet.list_runs/alist_runs return every host's runs, tagged, equal to each host's EvalStore."""
    make_fleet(storage, {"alpha": 3, "beta": 2})
    make_fleet(storage, {"gamma": 2}, catalog=False)
    fleet = Fleet(storage)
    assert fleet.hosts() == ["alpha", "beta", "gamma"]
    listing = fleet.list_runs()
    assert listing.ok and listing.problems == []
    got = {(r.host, r.run_id): r.metadata for r in listing.runs}
    for host in ("alpha", "beta", "gamma"):
        for m in EvalStore(storage, host).list_runs():
            assert got.pop((host, m.run_id)) == m
    assert got == {}
    assert listing.runs[0].url == storage.url(
        f"{listing.runs[0].host}/runs/{listing.runs[0].run_id}"
    )

    async def alist() -> list[tuple[str, str]]:
        try:
            return [(r.host, r.run_id) for r in (await fleet.alist_runs()).runs]
        finally:
            aclose = getattr(storage, "aclose", None)
            if aclose is not None:
                await aclose()

    assert asyncio.run(alist()) == [(r.host, r.run_id) for r in listing.runs]


def test_prefix_holding_a_store_is_one_host_named_empty(storage: AnyStorage) -> None:
    """A prefix that holds runs/ itself is a single store: one host, named ""."""
    make_runs(EvalStore(storage), 2)
    fleet = Fleet(storage)
    assert fleet.hosts() == [""]
    assert [(r.host, r.run_id) for r in fleet.list_runs().runs] == [("", "run001"), ("", "run000")]


def test_empty_host_is_reported_and_the_rest_listed(storage: AnyStorage) -> None:
    """A host prefix without runs is a problem naming its URL (not an error); others are listed."""
    make_fleet(storage, {"alpha": 2})
    storage.write("empty/notes.txt", b"nothing here")
    listing = Fleet(storage).list_runs()
    assert listing.ok
    assert [r.host for r in listing.runs] == ["alpha", "alpha"]
    (problem,) = listing.problems
    assert problem.host == "empty" and problem.error is None
    assert storage.url("empty/runs") in problem.message and "no runs" in problem.message


def test_find_run_and_ambiguous_ids(storage: AnyStorage) -> None:
    """read_run finds the one host holding an id, names every host when several do, else not found."""
    make_fleet(storage, {"alpha": 2, "beta": 1})
    EvalStore(storage, "beta").create_run("m", ["gsm8k"], run_id="alpha-run000")
    fleet = Fleet(storage)
    assert fleet.read_run("alpha-run001").host == "alpha"
    with pytest.raises(AmbiguousRunError) as info:
        fleet.read_run("alpha-run000")
    assert info.value.hosts == ["alpha", "beta"] and "alpha, beta" in str(info.value)
    with pytest.raises(FileNotFoundError):
        fleet.read_run("nope")


def test_host_that_fails_is_reported_rest_listed_on_s3(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3, a host whose requests are denied is a problem naming its URL; the other hosts are listed."""
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        make_fleet(direct, {"alpha": 2, "beta": 2})
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.add(Rule(action="status", status=403, path_contains="beta", times=None))
        with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url, max_attempts=1) as s:
            listing = Fleet(s).list_runs()
            found, problems = Fleet(s).find_run("alpha-run000")
    assert [r.host for r in listing.runs] == ["alpha", "alpha"]
    assert not listing.ok
    (problem,) = listing.failed
    assert problem.host == "beta" and isinstance(problem.error, AccessDeniedError)
    assert f"s3://{S3_BUCKET}/{unique_prefix}/beta" in problem.message
    assert [r.host for r in found] == ["alpha"] and [p.host for p in problems] == ["beta"]


def test_fleet_is_exported() -> None:
    """Fleet, FleetListing and FleetRun are re-exported from evalsyncd and listed in __all__."""
    import evalsyncd.fleet as fleet_module

    for name in ("Fleet", "FleetListing", "FleetRun"):
        assert getattr(evalsyncd, name) is getattr(fleet_module, name)
        assert name in evalsyncd.__all__
    assert set(fleet_module.__all__) <= {n for n in dir(fleet_module) if not n.startswith("_")}


# ── runs ls / show ─────────────────────────────────────────────────────────────


def _metadata_files(root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (p.parents[2].name, p.parent.name): json.loads(p.read_bytes())
        for p in root.glob("*/runs/*/metadata.json")
    }


def test_runs_ls_json_of_a_local_fleet_equals_metadata(tmp_path: Path) -> None:
    """`runs ls --json FLEET` prints one array: every run, tagged by host, equal to its metadata.json."""
    fleet = tmp_path / "fleet"
    for host, n in (("h1", 2), ("h2", 3)):
        make_runs(EvalStore(fleet / host), n, model=f"m-{host}")
    out = run_cli("runs", "ls", "--json", str(fleet))
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    files = _metadata_files(fleet)
    assert len(rows) == len(files) == 5
    for row in rows:
        host = row.pop("host")
        assert row == files[(host, row["run_id"])]
    single = json.loads(run_cli("runs", "ls", "--json", str(fleet / "h1")).stdout)
    assert {r["host"] for r in single} == {""} and len(single) == 2
    text = run_cli("runs", "ls", str(fleet)).stdout
    assert text.splitlines()[0].startswith("h1  run001") or "h2" in text.splitlines()[0]


def test_runs_ls_bad_input_names_each_key_and_lists_the_rest(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """A corrupt catalog, an empty host, an unparseable metadata.json and an unreachable bucket
    each get a message naming the key; the readable runs are still listed (exit 1 for the outage)."""
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as s:
        make_fleet(s, {"good": 2, "corrupt": 2, "badmeta": 2})
        s.write("corrupt/.evalsyncd/catalog.json", b'{"format": "evalsyncd-catalog", "ver')
        s.write("badmeta/runs/badmeta-run001/metadata.json", b'{"run_id": "badm')
        write_catalog(s, "badmeta")
        s.write("empty/runs.jsonl.bak", b"x")
    fleet_url = f"s3://{S3_BUCKET}/{unique_prefix}"
    out = run_cli("runs", "ls", "--json", fleet_url, "s3://no-such-bucket-evalsyncd/evals")
    assert out.returncode == 1, out.stderr
    rows = json.loads(out.stdout)
    assert sorted((r["host"], r["run_id"]) for r in rows) == [
        ("badmeta", "badmeta-run000"),
        ("corrupt", "corrupt-run000"),
        ("corrupt", "corrupt-run001"),
        ("good", "good-run000"),
        ("good", "good-run001"),
    ]
    err = out.stderr
    assert f"{fleet_url}/corrupt/.evalsyncd/catalog.json: corrupt catalog" in err
    assert f"{fleet_url}/empty/runs/: no runs" in err
    assert f"{fleet_url}/badmeta/runs/badmeta-run001/metadata.json: not valid JSON" in err
    assert "s3://no-such-bucket-evalsyncd/evals" in err and "BucketNotFoundError" in err


def test_runs_show_finds_the_host_and_refuses_ambiguous_ids(tmp_path: Path) -> None:
    """`runs show FLEET ID` shows the run from its host; an id on two hosts exits 1 naming both."""
    fleet = tmp_path / "fleet"
    make_runs(EvalStore(fleet / "h1"), 2)
    EvalStore(fleet / "h2").create_run("other", ["gsm8k"], run_id="only-here")
    EvalStore(fleet / "h2").create_run("dup", ["gsm8k"], run_id="run000")
    show = run_cli("runs", "show", "--json", str(fleet), "only-here")
    assert show.returncode == 0, show.stderr
    details = json.loads(show.stdout)
    assert details["host"] == "h2" and details["metadata"]["model_name"] == "other"
    dup = run_cli("runs", "show", str(fleet), "run000")
    assert dup.returncode == 1
    assert "run000 is on 2 hosts" in dup.stderr and "h1, h2" in dup.stderr
    missing = run_cli("runs", "show", str(fleet), "nope")
    assert missing.returncode == 1 and "nope not found" in missing.stderr


# ── restore ────────────────────────────────────────────────────────────────────


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_restore_from_an_s3_fleet_byte_for_byte_idempotent_and_refusing_differences(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """restore copies one run's files and index line exactly; again is a no-op; a differing local
    run is refused with exit 1 and left untouched."""
    src = tmp_path / "src"
    store = EvalStore(src)
    make_runs(store, 2)
    for i in range(3):
        store.write_trajectory("run001", "gsm8k", StoredTrajectory(idx=i, benchmark="gsm8k"))
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as s:
        for path, data in _tree(src).items():
            s.write(f"hostA/{path}", data)
    fleet_url = f"s3://{S3_BUCKET}/{unique_prefix}"
    dest = tmp_path / "dest"
    EvalStore(dest).create_run("local", ["x"], run_id="mine")
    index_before = (dest / "runs.jsonl").read_bytes()

    out = run_cli("restore", fleet_url, "run001", "--root", str(dest))
    assert out.returncode == 0, out.stderr
    assert f"restored {len(_tree(src / 'runs/run001'))} files" in out.stdout
    assert _tree(dest / "runs/run001") == _tree(src / "runs/run001")
    (src_line,) = [
        line for line in (src / "runs.jsonl").read_bytes().splitlines(True) if b"run001" in line
    ]
    assert (dest / "runs.jsonl").read_bytes() == index_before + src_line
    assert sorted(m.run_id for m in EvalStore(dest).list_runs()) == ["mine", "run001"]

    again = run_cli("restore", f"{fleet_url}/hostA", "run001", "--root", str(dest))
    assert again.returncode == 0 and "already present and identical" in again.stdout
    assert (dest / "runs.jsonl").read_bytes() == index_before + src_line

    (dest / "runs/run001/gsm8k/result.json").write_bytes(b"{}")
    before = _tree(dest)
    refused = run_cli("restore", fleet_url, "run001", "--root", str(dest))
    assert refused.returncode == 1
    assert "result.json differs" in refused.stderr and "refusing" in refused.stderr
    assert _tree(dest) == before
    missing = run_cli("restore", fleet_url, "nope", "--root", str(dest))
    assert missing.returncode == 1 and "nope not found" in missing.stderr


# ── Fast start ─────────────────────────────────────────────────────────────────

_HEAVY = (
    "aioboto3",
    "botocore",
    "boto3",
    "gcloud",
    "aiohttp",
    "watchdog",
    "prometheus_client",
    "pydantic",
    "pydantic_settings",
    "structlog",
    "evalsyncd.sync",
    "evalsyncd.config",
    "evalsyncd.storage.s3",
    "evalsyncd.storage.gcs",
)


@pytest.mark.parametrize("command", ["ls", "show", "report", "restore"])
def test_runs_commands_on_a_local_path_import_no_daemon_and_no_cloud_sdk(
    tmp_path: Path, command: str
) -> None:
    """`runs ls|show|report` and `restore` of a local path load neither the daemon nor a cloud SDK."""
    make_runs(EvalStore(tmp_path / "fleet" / "h1"), 1)
    argv = {
        "ls": ["runs", "ls", str(tmp_path / "fleet")],
        "show": ["runs", "show", str(tmp_path / "fleet"), "run000"],
        "report": ["runs", "report", str(tmp_path / "fleet"), "-o", str(tmp_path / "r.html")],
        "restore": ["restore", str(tmp_path / "fleet"), "run000", "--root", str(tmp_path / "d")],
    }[command]
    code = (
        "import sys\n"
        "from evalsyncd.cli import main\n"
        f"rc = main({argv!r})\n"
        f"heavy = {_HEAVY!r}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy)\n"
        "print('LOADED', loaded, rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "LOADED [] 0", out.stdout + out.stderr


def test_cli_import_time_is_small() -> None:
    """`import evalsyncd.cli` costs under 0.35 s of import time (python -X importtime)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import evalsyncd.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    total_us = max(
        int(line.split("|")[1])
        for line in out.stderr.splitlines()
        if line.endswith("evalsyncd.cli")
    )
    assert total_us < 350_000, total_us


def test_runs_ls_of_a_host_and_a_fleet_reads_the_catalogs_on_s3(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3, `runs ls` of a host prefix costs 5 requests and of a fleet 2 + 3 per host, via the
    catalogs (per host: LIST runs/, LIST its tail log, GET its catalog), plus, because these
    hosts have no tail log, one LIST per prefix level above the opened storage (`t/` and the
    bucket's root), once: a destination's tail log could be there (a reader at a sub-prefix)."""
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as s:
        make_fleet(s, {"alpha": 6, "beta": 5, "gamma": 4})
    url = f"s3://{S3_BUCKET}/{unique_prefix}"
    with CountingProxy("127.0.0.1", s3_server.port) as proxy:
        env = {"AWS_ENDPOINT_URL_S3": proxy.url}
        host = run_cli("runs", "ls", "--json", f"{url}/alpha", env=env)
        host_requests = proxy.requests
        proxy.reset()
        fleet = run_cli("runs", "ls", "--json", url, env=env)
        fleet_requests = proxy.requests
    assert host.returncode == 0 and fleet.returncode == 0, host.stderr + fleet.stderr
    assert len(json.loads(host.stdout)) == 6 and len(json.loads(fleet.stdout)) == 15
    assert host_requests == 5 + 2, host_requests
    assert fleet_requests == 2 + 1 + 3 * 3, fleet_requests


def test_fleet_listing_of_every_host_kind_costs_three_requests_a_healthy_host_on_s3(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """`runs ls --json` of a fleet on SeaweedFS, counted by a proxy: a host mirrored by the
    daemon with its tail log on (its runs only in main objects, the tail's newest object
    kept), one with an evicted run, one with the tail log off, each cost 3 requests (the
    tail log's LIST and GET and the catalog's GET: the tail vouches for the catalog, no LIST
    of runs/; or LIST runs/ when there is no tail); a host with no catalog adds a read per
    run; a host with a run only in the tail (staged since its catalog) and one whose newest
    tail object is damaged list runs/ too (4). Every run is listed, the damaged tail named."""
    from evalsyncd.catalog import CATALOG_MARK
    from evalsyncd.cli import main
    from evalsyncd.storage._bridge import run_sync
    from evalsyncd.storage._tailfind import search_levels
    from evalsyncd.storage.tail import object_name, read_index
    from tests.daemon import write_config
    from tests.test_retention import DAY, _age

    base = f"s3://{S3_BUCKET}/{unique_prefix}"
    expected: dict[str, set[str]] = {}

    def mirror(host: str, runs: int, **dest: Any) -> Path:
        root = tmp_path / host
        store = EvalStore(root)
        for i in range(runs):
            rid = store.create_run("m", ["g"], checkpoint_name=f"s{i}", run_id=f"{host}-{i}")
            store.write_trajectory(rid, "g", StoredTrajectory(idx=0, benchmark="g"))
            store.write_summary(rid, {})
            store.finalize_run(rid)
        expected[host] = {f"{host}-{i}" for i in range(runs)}
        url = {"name": "s3", "url": f"{base}/{host}", "endpoint_url": s3_server.endpoint_url}
        cfg = write_config(tmp_path / f"{host}.toml", root, tmp_path / f"{host}-state",
                           [{**url, **dest}], **{"retention.enabled": True,
                                                 "retention.min_age_s": 3600.0})  # fmt: skip
        if host == "evicted":
            _age(root, f"{host}-0", 2 * DAY)
        assert main(["sync", "--once", "--config", str(cfg)]) == 0
        if host == "evicted":
            assert main(["evict", "--config", str(cfg)]) == 0
            assert not (root / f"runs/{host}-0/g/trajectories.jsonl").exists()
            assert main(["sync", "--once", "--config", str(cfg)]) == 0
        return root

    for host in ("daemon", "evicted", "tailonly", "damaged"):
        mirror(host, 3)
    mirror("perfile", 3, max_main_lag_s=0.0)
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as s:
        make_fleet(s, {"plain": 2}, catalog=False)  # an older daemon, or the catalog off
        expected["plain"] = {"plain-run000", "plain-run001"}
        tailonly = s.child("tailonly")
        index = run_sync(read_index(tailonly))
        writer = tailonly.tail_writer(index.writer)  # the daemon's own, as its next flush
        run_sync(writer.open())
        scratch = EvalStore(tmp_path / "scratch")
        scratch.create_run("m", ["g"], checkpoint_name="new", run_id="tailonly-new")
        meta = (tmp_path / "scratch/runs/tailonly-new/metadata.json").read_bytes()
        writer.stage_replace("runs/tailonly-new/metadata.json", meta, mtime=0.0)
        writer.mark(CATALOG_MARK)
        run_sync(writer.commit())
        expected["tailonly"].add("tailonly-new")
        newest = run_sync(read_index(s.child("damaged"))).seq
    raw = s3_server.raw_client()
    try:
        key = f"{unique_prefix}/damaged/.evalsyncd/tail/{object_name(newest)}"
        raw.put_object(Bucket=S3_BUCKET, Key=key, Body=b"evalsyncd-tail 1 9\nnot zlib!")
    finally:
        raw.close()
    with CountingProxy("127.0.0.1", s3_server.port) as proxy:
        listed = run_cli(
            "runs", "ls", "--json", "--allow-skipped", base, env={"AWS_ENDPOINT_URL_S3": proxy.url}
        )
        requests = proxy.requests
    assert listed.returncode == 0, listed.stderr
    got: dict[str, set[str]] = {}
    for row in json.loads(listed.stdout):
        got.setdefault(row["host"], set()).add(row["run_id"])
    assert got == expected
    assert "damaged" in listed.stderr and key in listed.stderr, listed.stderr
    once = 1 + len(search_levels(unique_prefix, unique_prefix, 0))  # the fleet's LIST, levels
    healthy = 3 * 3  # daemon, evicted, perfile
    plain = 3 + 2  # its tail log's LIST, the catalog's GET (404), LIST runs/, a GET per run
    listing_too = 4 * 2  # tailonly, damaged: the tail's LIST and GET, the catalog, runs/
    assert requests == once + healthy + plain + listing_too, requests
