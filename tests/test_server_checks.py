"""Know the server and check what it did: the probe (``evalsyncd check``), post-conditions of
S3 appends, SDK surprises translated, and moto's server as a second S3 next to SeaweedFS.

Servers: SeaweedFS, moto's server and fake-gcs-server on loopback; a fault proxy
(``tests/faultproxy.py``) imitates ``rclone serve s3``, which answers ``UploadPartCopy`` with
an empty 200.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evalsyncd.errors import ConflictError, ServerBehaviourError
from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage._bridge import run_sync
from evalsyncd.storage.probe import FEATURES, probe
from evalsyncd.testing.servers import MotoS3Server, S3Server, SeaweedS3Server
from tests.conftest import S3_BUCKET
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import lean_put_of
from tests.opshelpers import evalsyncd

MiB = 1024 * 1024


def _lines(size: int) -> bytes:
    line = b'{"pad": "' + b"x" * 90 + b'"}\n'
    return line * (size // len(line) + 1)


@pytest.fixture(params=["seaweedfs", "moto"])
def s3_any(request: pytest.FixtureRequest, cloud_env: dict[str, str]) -> S3Server:
    """Each S3 implementation in turn (their ``enforces_*`` flags say what they check)."""
    server: S3Server = request.getfixturevalue(
        "s3_server" if request.param == "seaweedfs" else "moto_server"
    )
    return server


@pytest.fixture
def s3_on(s3_any: S3Server, unique_prefix: str) -> Iterator[S3Storage]:
    storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_any.endpoint_url)
    with storage:
        yield storage


def _internal_keys(storage: S3Storage | GCSStorage, under: str) -> list[str]:
    return run_sync(storage._list_keys(storage._internal_key(under) + "/", storage.url()))


# -- the probe ------------------------------------------------------------------------------


def test_probe_reports_each_s3_servers_features_and_cleans_up(
    s3_any: S3Server, s3_on: S3Storage
) -> None:
    """SeaweedFS has every feature; moto lacks the two multipart preconditions (its flags say
    so); both are usable, and no probe object is left behind."""
    report = probe(s3_on)
    assert [r.feature for r in report.results] == list(FEATURES)
    missing = {r.feature for r in report.missing()}
    expected = set()
    if not s3_any.enforces_copy_source_if_match:
        expected.add("copy-source-if-match")
    if not s3_any.enforces_if_match_on_complete:
        expected.add("complete-if-match")
    assert missing == expected, report.results
    assert report.usable
    for r in report.missing():
        assert "HTTP 200" in r.answer and r.consequence
    assert _internal_keys(s3_on, "probe") == []


def test_probe_on_fake_gcs_server(gcs_storage: GCSStorage) -> None:
    """fake-gcs-server composes right and refuses stale uploads, but ignores ifGenerationMatch on
    compose (an emulator limit the probe names)."""
    report = probe(gcs_storage)
    missing = {r.feature for r in report.missing()}
    assert missing == {"copy-source-if-match", "complete-if-match"}, report.results
    assert report.get("multipart-copy") is not None and report.get("multipart-copy").ok  # type: ignore[union-attr]
    assert _internal_keys(gcs_storage, "probe") == []


def _rclone_like(proxy: FaultProxy) -> None:
    """Answer every UploadPartCopy with an empty 200, as ``rclone serve s3`` does."""
    proxy.add(Rule(action="empty_200", method="PUT", header="x-amz-copy-source", times=None))


def test_probe_names_a_broken_upload_part_copy_and_check_exits_zero_with_the_fallback(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """Behind a server that answers UploadPartCopy with an empty 200, the probe reports
    multipart-copy missing with the answer, and `evalsyncd check` prints it and the fallback."""
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        _rclone_like(proxy)
        storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url)
        with storage:
            report = probe(storage)
        result = report.get("multipart-copy")
        assert result is not None and not result.ok
        assert "without a part ETag" in result.answer and "rewrite" in result.consequence
        done = evalsyncd(
            "check",
            f"s3://{S3_BUCKET}/{unique_prefix}",
            "--json",
            env={"AWS_ENDPOINT_URL_S3": proxy.url},
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["usable"] is True
    assert {r["feature"]: r["ok"] for r in out["results"]}["multipart-copy"] is False


def test_check_of_a_missing_bucket_is_one_clear_line(
    moto_server: MotoS3Server, cloud_env: dict[str, str]
) -> None:
    """`evalsyncd check` of a missing bucket exits 1 with an error naming it, no traceback
    (on moto: SeaweedFS creates a bucket on its first PutObject)."""
    done = evalsyncd(
        "check", "s3://no-such-bucket-here/p", env={"AWS_ENDPOINT_URL_S3": moto_server.endpoint_url}
    )
    assert done.returncode == 1
    assert "no-such-bucket-here" in done.stderr and "Traceback" not in done.stderr


# -- post-conditions of S3 appends ------------------------------------------------------------


def test_append_through_a_broken_upload_part_copy_is_a_clear_error_then_a_fallback(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """An empty 200 to UploadPartCopy is a ServerBehaviourError naming the call (never a
    KeyError), the object is untouched, and with multipart_copy off the append succeeds."""
    base = _lines(5 * MiB)
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        direct.write("big.jsonl", base)
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        _rclone_like(proxy)
        storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url, max_attempts=1)
        with storage:
            with pytest.raises(ServerBehaviourError) as info:
                storage.append("big.jsonl", b'{"new": 1}\n', offset=len(base))
            assert info.value.feature == "UploadPartCopy"
            assert "without an ETag" in str(info.value) and "big.jsonl" in str(info.value)
            assert storage.read("big.jsonl") == base
            storage.multipart_copy = False  # what the daemon does when the probe says so
            storage.append("big.jsonl", b'{"new": 1}\n', offset=len(base))
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        direct.read_tail = False
        assert direct.read("big.jsonl") == base + b'{"new": 1}\n'


def test_concurrent_large_appends_never_mix_and_report_by_server(
    s3_any: S3Server, s3_on: S3Storage
) -> None:
    """Concurrent appends at one offset to a 5 MiB object: the object ends as base + one of
    them; on a server enforcing If-Match on Complete exactly one is acknowledged (moto does
    not: there the post-condition HEAD catches most losers, not all)."""
    base = _lines(5 * MiB)
    s3_on.write("race.jsonl", base)

    async def contend() -> list[BaseException | None]:
        async with s3_on:
            results = await asyncio.gather(
                *(
                    s3_on.aappend("race.jsonl", f'{{"w": {i}}}\n'.encode(), offset=len(base))
                    for i in range(4)
                ),
                return_exceptions=True,
            )
        return [r if isinstance(r, BaseException) else None for r in results]

    outcomes = asyncio.run(contend())
    mixed = [r for r in outcomes if isinstance(r, ServerBehaviourError)]
    if mixed and not s3_any.enforces_copy_source_if_match:
        # a loser's UploadPartCopy took in a winner's completed append: its post-condition
        # finds its own ETag on a bigger object and says so (no acknowledged line is lost)
        assert all("CopySourceIfMatch" in str(r) for r in mixed), mixed
        pytest.xfail(f"{s3_any.name} ignores CopySourceIfMatch: a copy took in another append")
    assert all(isinstance(r, ConflictError) for r in outcomes if r is not None), outcomes
    final = s3_on.read("race.jsonl")
    assert final[: len(base)] == base and final.count(b"\n") == base.count(b"\n") + 1
    winners = [i for i, r in enumerate(outcomes) if r is None]
    assert winners, outcomes
    if len(winners) != 1 and not s3_any.enforces_if_match_on_complete:
        pytest.xfail(
            f"{s3_any.name} ignores If-Match on CompleteMultipartUpload: {len(winners)} appends "
            "were acknowledged (each saw its own ETag in the post-condition HEAD before the next "
            "Complete replaced it)"
        )
    if len(winners) != 1 and not s3_any.atomic_if_match_on_complete:
        pytest.xfail(
            f"{s3_any.name} checks If-Match on CompleteMultipartUpload, then replaces the "
            f"object: {len(winners)} concurrent Completes passed the check (docs/design.md §11)"
        )
    assert len(winners) == 1, outcomes
    assert final == base + f'{{"w": {winners[0]}}}\n'.encode()


# -- the daemon on moto's server next to SeaweedFS -------------------------------------------


def test_daemon_mirrors_to_moto_and_seaweedfs_through_a_kill_9(
    tmp_path: Path,
    cloud_env: dict[str, str],
    s3_server: SeaweedS3Server,
    moto_server: MotoS3Server,
    unique_prefix: str,
) -> None:
    """One daemon, one destination on each S3 implementation, a file crossing 5 MiB and a
    kill -9: both buckets end byte-identical to the local files, every line once."""
    from tests.daemon import Daemon, wait_mirrored, write_config

    root = tmp_path / "root"
    big = root / "runs/r1/gsm8k/trajectories.jsonl"
    big.parent.mkdir(parents=True)
    (root / "runs/r1/metadata.json").write_text('{"run_id": "r1"}')
    dests, readers = [], []
    for name, server in (("seaweed", s3_server), ("moto", moto_server)):
        dests.append(
            {
                "name": name,
                "url": f"s3://{S3_BUCKET}/{unique_prefix}/{name}",
                "endpoint_url": server.endpoint_url,
                "max_main_lag_s": 0.0,
            }
        )
        readers.append(
            S3Storage(S3_BUCKET, f"{unique_prefix}/{name}", endpoint_url=server.endpoint_url)
        )
    cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", dests)
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        pad = "y" * 2000
        with open(big, "ab") as f:
            while not stop.is_set() and written[0] < 3200:  # about 6.4 MiB
                f.write(f'{{"n": {written[0]}, "pad": "{pad}"}}\n'.encode())
                f.flush()
                written[0] += 1
                if written[0] % 200 == 0:
                    time.sleep(0.05)

    t = threading.Thread(target=writer)
    t.start()
    try:
        daemon.start()
        time.sleep(random.Random(5).uniform(0.5, 1.5))
        daemon.kill()
    finally:
        t.join()
        stop.set()
    with daemon:
        for reader in readers:
            with reader:
                wait_mirrored(root, reader, timeout_s=120)
    for reader in readers:
        with reader:
            reader.read_tail = False
            assert reader.read("runs/r1/gsm8k/trajectories.jsonl") == big.read_bytes()


# -- GCS answers (pure) -------------------------------------------------------------------------


def test_gcs_object_without_size_is_empty_and_without_generation_is_a_clear_error() -> None:
    """An object resource without `size` (Google's testbench, for an empty object) is 0 bytes;
    one without `generation` is a ServerBehaviourError naming the URL and the fields seen."""
    from evalsyncd.storage.gcs import _stat_of

    st = _stat_of({"generation": "7", "updated": "2026-01-01T00:00:00+00:00"}, "gs://b/k")
    assert (st.size, st.version) == (0, "7")
    with pytest.raises(ServerBehaviourError) as info:
        _stat_of({"size": "3", "name": "k"}, "gs://b/k")
    assert "gs://b/k" in str(info.value) and "name, size" in info.value.answer


# -- leftovers of failed cleanups ---------------------------------------------------------------


def test_old_gcs_compose_deltas_are_removed_young_ones_kept(gcs_storage: GCSStorage) -> None:
    """A compose delta left by a failed delete is removed once older than the safe age; a young
    one (an append may be in flight) and the prefix's files are kept."""
    from evalsyncd.storage.reap import areap

    gcs_storage.write("keep.json", b"{}")
    run_sync(gcs_storage.awrite_internal("gcs-append/leftover", b"delta"))
    assert run_sync(areap(gcs_storage)) == 0  # younger than an hour
    assert _internal_keys(gcs_storage, "gcs-append") != []
    assert run_sync(areap(gcs_storage, min_age_s=0.0)) == 1
    assert _internal_keys(gcs_storage, "gcs-append") == []
    assert gcs_storage.read("keep.json") == b"{}"


def test_old_multipart_uploads_under_the_prefix_are_aborted_others_kept(
    s3_server: SeaweedS3Server, s3_on: S3Storage, s3_any: S3Server
) -> None:
    """An abandoned multipart upload under the prefix is aborted once old enough; one under
    another prefix is never touched."""
    from evalsyncd.storage.reap import areap

    raw = s3_any.raw_client()
    try:
        mine = raw.create_multipart_upload(Bucket=S3_BUCKET, Key=f"{s3_on.prefix}/f.jsonl")
        other = raw.create_multipart_upload(Bucket=S3_BUCKET, Key=f"{s3_on.prefix}-other/f.jsonl")
        young = run_sync(areap(s3_on))
        if young and not s3_any.dates_uploads:
            raw.abort_multipart_upload(
                Bucket=S3_BUCKET, Key=f"{s3_on.prefix}-other/f.jsonl", UploadId=other["UploadId"]
            )
            pytest.xfail(
                f"{s3_any.name} dates every upload in 2010 (ListMultipartUploads Initiated): "
                "a young upload looks abandoned"
            )
        assert young == 0
        time.sleep(1.1)  # S3 times uploads to the second
        assert run_sync(areap(s3_on, min_age_s=1.0)) == 1
        left = raw.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=s3_on.prefix).get("Uploads", [])
        assert [u["UploadId"] for u in left] == [other["UploadId"]]
        assert mine["UploadId"] not in [u["UploadId"] for u in left]
        raw.abort_multipart_upload(
            Bucket=S3_BUCKET, Key=f"{s3_on.prefix}-other/f.jsonl", UploadId=other["UploadId"]
        )
    finally:
        raw.close()


def test_daemon_behind_a_broken_upload_part_copy_falls_back_once_and_mirrors(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """A daemon whose server answers UploadPartCopy with an empty 200 logs the missing feature
    and its fallback once at start, then mirrors a file growing past 5 MiB byte for byte
    (whole rewrites), with no traceback in its log."""
    from tests.daemon import Daemon, wait_mirrored, write_config
    from tests.reliability import events

    root = tmp_path / "root"
    big = root / "runs/r1/b/trajectories.jsonl"
    big.parent.mkdir(parents=True)
    big.write_bytes(_lines(5 * MiB + 1000))
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        _rclone_like(proxy)
        dest = {
            "name": "rclone-like",
            "url": f"s3://{S3_BUCKET}/{unique_prefix}",
            "endpoint_url": proxy.url,
            "max_main_lag_s": 0.0,
        }
        cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", [dest])
        reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
        with Daemon(cfg, tmp_path / "daemon.log") as daemon, reader:
            wait_mirrored(root, reader, timeout_s=60)
            with open(big, "ab") as f:
                f.write(b'{"more": 1}\n' * 100)
            wait_mirrored(root, reader, timeout_s=60)
            missing = events(daemon, "server_features_missing")
    assert len(missing) == 1, missing
    assert "multipart-copy" in missing[0]["missing"]
    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log and "KeyError" not in log


@pytest.mark.parametrize(
    ("action", "feature"),
    [
        # an empty 200: no ETag, which the journal needs as the next If-Match
        ("empty_200", "PutObject"),
        # a 200 whose x-amz-checksum-crc32c is not the body's (the server stored other bytes)
        ("wrong_checksum", "PutObject checksum"),
    ],
)
def test_a_put_answered_wrongly_is_a_server_behaviour_error(
    s3_server: SeaweedS3Server,
    cloud_env: dict[str, str],
    unique_prefix: str,
    action: str,
    feature: str,
) -> None:
    """A 200 to a PutObject without an ETag, or with the CRC32C of other bytes, is a
    ServerBehaviourError naming the feature and the key, not success (nor a KeyError)."""
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.add(Rule(action=action, method="PUT", times=1))
        with (
            S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url) as storage,
            pytest.raises(ServerBehaviourError) as info,
        ):
            storage.write("a.json", b"{}")
    assert info.value.feature == feature and "a.json" in str(info.value)


@pytest.mark.parametrize("fault", ["slowdown", "reset_before", "reset_after"])
def test_a_small_put_the_lean_path_could_not_finish_is_sent_again_through_the_sdk(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str, fault: str
) -> None:
    """A small PutObject sent without the SDK that meets a throttle, a reset before the server
    saw it or a lost answer (the server applied it) is sent again through the SDK: the write
    and the new file's append each land once, whole, and no error reaches the caller."""
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url) as storage:
            proxy.add(Rule(action=fault, method="PUT", times=1))
            storage.write("a.json", b'{"a": 1}')
            proxy.add(Rule(action=fault, method="PUT", times=1))
            storage.append("b.jsonl", b"1\n", offset=0)  # If-None-Match: *
            lean = lean_put_of(storage)
            assert lean is not None
            if fault == "slowdown":  # a reset: aiohttp itself may send the PUT again first
                assert lean.fallbacks == 2
        puts = [a for m, _t, a in proxy.log if m == "PUT"]
        assert puts.count(fault) == 2 and len(puts) >= 4, proxy.log
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        assert direct.read("a.json") == b'{"a": 1}'
        assert direct.read("b.jsonl") == b"1\n"


def test_keys_of_any_character_go_through_the_lean_path(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """Keys with every printable ASCII punctuation character, spaces and non-ASCII letters are
    signed as sent: the server accepts the lean path's signature (no request handed to the
    SDK) and each object reads back under its own key."""
    names = [f"runs/p{i}{c}x.json" for i, c in enumerate(" !\"#$%&'()*+,-.:;<=>?@[]^_`{|}~")]
    names += ["runs/ünï cødé/データ.json", "runs/a+b=c/d&e.jsonl"]
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as storage:
        for i, name in enumerate(names):
            storage.write(name, f'{{"i": {i}}}'.encode())
        lean = lean_put_of(storage)
        assert lean is not None and lean.fallbacks == 0
        for i, name in enumerate(names):
            assert storage.read(name) == f'{{"i": {i}}}'.encode(), name


def test_an_answer_the_lean_path_cannot_act_on_turns_it_off(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """A small PutObject answered with something only the SDK can act on (here a 403; a
    redirect to another region is the same) is sent again through the SDK, and every later
    PutObject of that client goes through the SDK: one detour, not one per request."""
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url) as storage:
            proxy.add(Rule(action="status", status=403, method="PUT", times=1))
            for i in range(3):
                storage.write(f"{i}.json", b"{}")
            lean = lean_put_of(storage)
            assert lean is not None and not lean.enabled and lean.fallbacks == 1
            assert [storage.read(f"{i}.json") for i in range(3)] == [b"{}"] * 3
        assert [a for m, _t, a in proxy.log if m == "PUT"] == ["status", "pass", "pass", "pass"]


def test_a_failed_precondition_on_the_lean_path_is_the_answer(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """A 412 to a small conditional PutObject is a ConflictError at once: one request, not
    sent again through the SDK, and the object is untouched."""
    proxy = FaultProxy("127.0.0.1", s3_server.port)
    with proxy, S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url) as storage:
        storage.write("c.jsonl", b"theirs\n")
        proxy.log.clear()
        with pytest.raises(ConflictError):
            run_sync(
                storage._requests.put(
                    run_sync(storage._client()),
                    storage._key("c.jsonl"),
                    storage.url("c.jsonl"),
                    b"mine\n",
                    IfNoneMatch="*",
                )
            )
        assert [m for m, _t, _a in proxy.log] == ["PUT"]
        assert storage.read("c.jsonl") == b"theirs\n"


def test_a_ranged_get_with_the_whole_objects_checksum_is_read_whole(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """A 206 carrying a checksum that is not its part's (rclone sends the whole object's) makes
    botocore refuse the part; the read falls back to a whole GET and returns the right bytes."""
    data = bytes(range(256)) * 40
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as direct:
        direct.write("f.bin", data)
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.add(Rule(action="checksum_206", method="GET", header="range", times=None))
        with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url, max_attempts=1) as s:
            assert s.read_range("f.bin", 100, 50) == data[100:150]
            assert s.read_range("f.bin", 0, 10) == data[:10]
            assert s._requests.whole_reads  # botocore did refuse the part: the fallback ran
        assert proxy.fired("checksum_206") >= 1


def test_a_transient_error_during_the_probe_is_no_missing_feature(
    s3_server: SeaweedS3Server, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """A 503 in the middle of the probe fails the probe (TransientStorageError: try later); it is
    never reported as a feature the server lacks."""
    from evalsyncd.errors import TransientStorageError

    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.add(Rule(action="slowdown", method="PUT", skip=1, times=None))
        storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=proxy.url, max_attempts=1)
        with storage, pytest.raises(TransientStorageError):
            probe(storage)
