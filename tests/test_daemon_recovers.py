"""A running daemon recovers without a restart: a start probe that found no server is retried
with the backoff, and leftovers of failed cleanups are reaped while it runs.

Real servers (SeaweedFS, fake-gcs-server) behind the fault proxy; the daemon is a subprocess
that stays up for the whole test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.storage._bridge import run_sync
from evalsyncd.testing.servers import FakeGCSServer, SeaweedS3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.daemon import Daemon, wait_mirrored, write_config
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import wait_for
from tests.opshelpers import evalsyncd as run_cli
from tests.reliability import append_line, events

_FAST_RETRY = {
    "initial_backoff_s": 0.2,
    "max_backoff_s": 0.5,
    "connect_timeout_s": 1.0,
    "read_timeout_s": 2.0,
}


def _write_run(root: Path) -> Path:
    run = root / "runs/r1"
    (run / "b").mkdir(parents=True)
    (run / "metadata.json").write_text(json.dumps({"run_id": "r1", "model_name": "m"}))
    traj = run / "b/trajectories.jsonl"
    for i in range(20):
        append_line(traj, {"idx": i, "pad": "x" * 200})
    return traj


def _delta_keys(storage: GCSStorage) -> list[str]:
    async def go() -> list[str]:
        return await storage._list_keys(storage._internal_key("gcs-append") + "/", storage.url())

    return run_sync(go())


def test_start_probe_without_a_server_is_retried_and_the_daemon_ships_once_it_passes(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """A daemon started while its server is unreachable (every connection reset) parks nothing:
    the destination backs off, `status` names the failed probe, and once the server answers the
    probe passes and the files are mirrored, with no restart."""
    root = tmp_path / "root"
    _write_run(root)
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.add(Rule("reset_before", times=None))  # the server is unreachable
        dest = {
            "name": "s3",
            "url": f"s3://{S3_BUCKET}/{unique_prefix}",
            "endpoint_url": proxy.url,
            "max_attempts": 1,
            "retry": _FAST_RETRY,
        }
        cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", [dest])
        reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
        with Daemon(cfg, tmp_path / "daemon.log") as daemon, reader:

            def probe_failed_twice() -> bool:
                failed = [
                    e
                    for e in events(daemon, "pass_failed")
                    if "server probe" in str(e.get("error"))
                ]
                return len(failed) >= 2

            wait_for(probe_failed_twice, timeout_s=30, what="the probe retried with the backoff")
            status = run_cli("status", "--config", str(cfg))
            assert "backoff" in status.stdout and "server probe" in status.stdout, status.stdout
            assert reader.list_dir("") == []  # nothing shipped: the server was never reached
            proxy.clear()  # the server is back
            wait_mirrored(root, reader, timeout_s=60)
            assert daemon.alive()  # the same process: no restart
            probed = events(daemon, "server_probed")
            assert probed, "the probe passed once the server answered"
            status = run_cli("status", "--config", str(cfg))
            assert "s3 (" in status.stdout and ": healthy" in status.stdout, status.stdout


def test_compose_deltas_left_by_failed_deletes_are_reaped_while_the_daemon_runs(
    tmp_path: Path, cloud_env: dict[str, str], gcs_server: FakeGCSServer, unique_prefix: str
) -> None:
    """On GCS, deletes of compose deltas that fail (503) leave deltas behind; once they are
    `reap_min_age_s` old the running daemon removes them (one listing), no restart."""
    root = tmp_path / "root"
    traj = _write_run(root)
    with FaultProxy("127.0.0.1", gcs_server.port) as proxy:
        dest: dict[str, Any] = {
            "name": "gcs",
            "url": f"gs://{GCS_BUCKET}/{unique_prefix}",
            "endpoint_url": proxy.url,
            "max_main_lag_s": 0.0,  # every flush appends to the main object: compose + delete
            "reap_min_age_s": 1.0,
            "reap_interval_s": 3600.0,  # only a failed cleanup brings the reap forward
            "retry": _FAST_RETRY,
        }
        cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", [dest])
        reader = GCSStorage(GCS_BUCKET, unique_prefix)
        with Daemon(cfg, tmp_path / "daemon.log") as daemon, reader:
            wait_mirrored(root, reader, timeout_s=60)
            proxy.add(Rule("status", status=503, method="DELETE", path_contains="gcs-append",
                           times=None))  # fmt: skip
            for n in range(3):
                append_line(traj, {"idx": 100 + n, "pad": "y" * 200})
                wait_mirrored(root, reader, timeout_s=60)
            wait_for(lambda: len(_delta_keys(reader)) >= 1, timeout_s=30, what="deltas left")
            assert events(daemon, "gcs_temporary_object_left")
            proxy.clear()  # deletes work again: the next reap removes what is old enough
            wait_for(lambda: _delta_keys(reader) == [], timeout_s=30, what="deltas reaped")
            assert daemon.alive()  # the same process: no restart
            assert events(daemon, "leftovers_removed")
            wait_mirrored(root, reader, timeout_s=30)  # the mirror is intact


def test_abandoned_multipart_upload_is_aborted_by_a_running_daemon(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3, a multipart upload abandoned under the prefix after the daemon started is aborted
    at the next `reap_interval_s` once `reap_min_age_s` old; one under another prefix is kept."""
    root = tmp_path / "root"
    _write_run(root)
    dest = {
        "name": "s3",
        "url": f"s3://{S3_BUCKET}/{unique_prefix}",
        "endpoint_url": s3_server.endpoint_url,
        "reap_min_age_s": 1.0,
        "reap_interval_s": 1.0,
    }
    cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", [dest])
    reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
    raw = s3_server.raw_client()
    try:
        with Daemon(cfg, tmp_path / "daemon.log") as daemon, reader:
            wait_mirrored(root, reader, timeout_s=60)
            mine = raw.create_multipart_upload(Bucket=S3_BUCKET, Key=f"{unique_prefix}/x.jsonl")
            other_key = f"{unique_prefix}-other/x.jsonl"
            other = raw.create_multipart_upload(Bucket=S3_BUCKET, Key=other_key)

            def uploads(prefix: str) -> list[str]:
                found = raw.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=prefix)
                return [u["UploadId"] for u in found.get("Uploads", [])]

            wait_for(
                lambda: mine["UploadId"] not in uploads(f"{unique_prefix}/"),
                timeout_s=30,
                what="the abandoned upload aborted",
            )
            assert daemon.alive()
            assert other["UploadId"] in uploads(f"{unique_prefix}-other/")
            raw.abort_multipart_upload(Bucket=S3_BUCKET, Key=other_key, UploadId=other["UploadId"])
    finally:
        raw.close()


def test_reap_is_due_at_its_interval_and_once_a_noted_leftover_is_old_enough() -> None:
    """The reap step (pure, clocks injected): due every interval; a cleanup failure noted
    since the last reap brings it forward to when that leftover is `min_age_s` old (plus the
    slack for servers' second-granular dates), never earlier; one reap handles it."""
    from types import SimpleNamespace

    from evalsyncd.storage.reap import note_left
    from evalsyncd.sync.steps import REAP_SLACK_S, ReapLeftovers

    now = {"mono": 100.0, "wall": 1_000_000.0}
    url = "memory://reap-unit/host-a"
    ctx = SimpleNamespace(
        storage=SimpleNamespace(url=lambda: url),
        clock=lambda: now["mono"],
        wall=lambda: now["wall"],
        name="d",
    )
    step = ReapLeftovers(ctx, interval_s=3600.0, min_age_s=60.0)  # type: ignore[arg-type]
    assert step.next_due_in() == 3600.0
    note_left(f"{url}-other/.evalsyncd/gcs-append/x", at=now["wall"])  # another prefix
    assert step.next_due_in() == 3600.0
    note_left(f"{url}/.evalsyncd/gcs-append/x", at=now["wall"] + 5)
    assert step.next_due_in() == 65.0 + REAP_SLACK_S
    now["mono"] += 10
    now["wall"] += 10
    assert step.next_due_in() == 55.0 + REAP_SLACK_S


def test_multipart_upload_left_by_a_failed_abort_is_reaped_while_the_daemon_runs(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3, an append of 5 MiB and more whose completion fails and whose abort fails too
    (fault proxy: 500s) leaves a multipart upload; once `reap_min_age_s` old, the running
    daemon aborts it, and the file is mirrored byte for byte, no restart."""
    root = tmp_path / "root"
    big = root / "runs/r1/b/trajectories.jsonl"
    big.parent.mkdir(parents=True)
    line = json.dumps({"pad": "z" * 4000}) + "\n"
    big.write_text(line * 1400)  # about 5.6 MiB: appends are multipart uploads
    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        dest = {
            "name": "s3",
            "url": f"s3://{S3_BUCKET}/{unique_prefix}",
            "endpoint_url": proxy.url,
            "max_main_lag_s": 0.0,
            "max_attempts": 1,
            "reap_min_age_s": 1.0,
            "reap_interval_s": 3600.0,  # only the failed abort brings the reap forward
            "retry": _FAST_RETRY,
        }
        cfg = write_config(tmp_path / "config.toml", root, tmp_path / "state", [dest])
        reader = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
        raw = s3_server.raw_client()

        def uploads() -> list[str]:
            found = raw.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=f"{unique_prefix}/")
            return [u["UploadId"] for u in found.get("Uploads", [])]

        try:
            with Daemon(cfg, tmp_path / "daemon.log") as daemon, reader:
                wait_mirrored(root, reader, timeout_s=60)
                proxy.add(Rule("status", status=500, method="POST", path_contains="uploadId="))
                proxy.add(Rule("status", status=500, method="DELETE", path_contains="uploadId=",
                               times=None))  # fmt: skip
                with open(big, "a") as f:
                    f.write(line * 3)
                wait_for(lambda: events(daemon, "s3_abort_failed"), timeout_s=30, what="abort")
                assert uploads(), "the failed abort left the upload"
                proxy.clear()
                wait_mirrored(root, reader, timeout_s=60)
                wait_for(lambda: uploads() == [], timeout_s=30, what="the upload reaped")
                assert daemon.alive()  # the same process: no restart
                # logged once the reap's requests are done (the abort may be seen first)
                wait_for(lambda: events(daemon, "leftovers_removed"), timeout_s=10, what="log")
        finally:
            raw.close()
