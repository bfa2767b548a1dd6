"""A bucket written by an older version with S3 append segments, taken over by this one.

Older versions appended below 5 MiB on S3 as segment objects under
``{prefix}/.evalsyncd/seg/`` that readers stitched after the main object. The
daemon folds them into the main objects once at start; until then (and for any
reader) an object carrying the old epoch reads as main object plus chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evalsyncd.storage import S3Storage
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import S3_BUCKET
from tests.helpers import old_layout, wait_for
from tests.opshelpers import DaemonProcess, write_config


@pytest.fixture
def raw(s3_server: SeaweedS3Server) -> Any:
    client = s3_server.raw_client()
    yield client
    client.close()


@pytest.mark.parametrize("max_main_lag_s", [0.0, 60.0])
def test_daemon_folds_an_older_versions_segments_at_start(
    tmp_path: Path,
    s3_server: SeaweedS3Server,
    cloud_env: dict[str, str],
    unique_prefix: str,
    raw: Any,
    max_main_lag_s: float,
) -> None:
    """The daemon (tail log on or off) folds every chain an older version left into its
    main object at start, deletes every segment, and then mirrors what was appended
    locally since: plain objects equal the local files, no epoch left."""
    root = tmp_path / "root"
    traj = root / "runs/r1/b/trajectories.jsonl"
    traj.parent.mkdir(parents=True)
    lines = [f'{{"idx": {i}}}\n'.encode() for i in range(6)]
    traj.write_bytes(b"".join(lines))  # 4 lines were mirrored, 2 appended since
    (root / "runs.jsonl").write_bytes(b'{"run_id": "r1"}\n')
    old_layout(raw, unique_prefix, "runs/r1/b/trajectories.jsonl", lines[0] + lines[1], lines[2:4])
    old_layout(raw, unique_prefix, "runs.jsonl", b'{"run_id": "r1"}\n', [])
    with S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url) as reader:
        assert reader.read("runs/r1/b/trajectories.jsonl") == b"".join(lines[:4])
    config = write_config(
        tmp_path / "c.toml",
        root,
        tmp_path / "state",
        [
            {
                "name": "s3",
                "url": f"s3://{S3_BUCKET}/{unique_prefix}",
                "endpoint_url": s3_server.endpoint_url,
                "max_main_lag_s": max_main_lag_s,
            }
        ],
        flush_interval_s=0.2,
    )

    def plain(path: str) -> tuple[bytes, dict[str, str]]:
        key = f"{unique_prefix}/{path}"
        body: bytes = raw.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read()
        return body, raw.head_object(Bucket=S3_BUCKET, Key=key)["Metadata"]

    def segments() -> list[str]:
        resp = raw.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"{unique_prefix}/.evalsyncd/seg/")
        return [o["Key"] for o in resp.get("Contents", ())]

    with DaemonProcess(config, tmp_path / "d.log") as daemon:
        wait_for(
            lambda: daemon.events("s3_segments_folded"), timeout_s=60, what="the fold at start"
        )
        wait_for(
            lambda: plain("runs/r1/b/trajectories.jsonl") == (b"".join(lines), {}),
            timeout_s=60,
            what="the plain object to catch up",
        )
        assert daemon.terminate() == 0
    (folded,) = [e for e in daemon.log_events() if e.get("event") == "s3_segments_folded"]
    assert folded["files"] == 2
    assert segments() == []
    assert plain("runs.jsonl") == (b'{"run_id": "r1"}\n', {})
