"""Helpers of the reliability suites (``tests/test_reliability*.py``).

A :class:`RelEnv` is one test's watched root, state directory, destinations
(S3, GCS, local directory) and a reader storage per destination; it writes the
daemon's configuration with short backoffs and timeouts, so faults are retried
quickly. :func:`snapshot` reads a whole destination with one listing (fast
with thousands of objects), and :func:`wait_settled` waits until every
destination equals :func:`~tests.daemon.expected_mirror` of the root.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

from evalsyncd.storage import AnyStorage, GCSStorage, LocalStorage, S3Storage
from evalsyncd.testing.servers import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.daemon import Daemon, expected_mirror, write_config
from tests.helpers import wait_for

MiB = 1024 * 1024

FAST_RETRY = {
    "initial_backoff_s": 0.1,
    "max_backoff_s": 1.0,
    "connect_timeout_s": 1.0,
    "read_timeout_s": 5.0,
}
"""Destination retry settings for tests: faults are retried within about a second."""


class RelEnv:
    """One test's root, state directory, destinations and their reader storages."""

    def __init__(self, tmp_path: Path, s3_endpoint: str, gcs_endpoint: str, prefix: str) -> None:
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.state = tmp_path / "state"
        self.prefix = prefix
        self.s3_endpoint = s3_endpoint
        self.gcs_endpoint = gcs_endpoint
        self.readers: dict[str, AnyStorage] = {}
        self.dests: list[dict[str, Any]] = []
        self.log_path = tmp_path / "daemon.log"

    def add(self, kind: str, *, endpoint_url: str | None = None, **extra: Any) -> AnyStorage:
        """Add a destination of ``kind`` (``s3``, ``gcs``, ``file``); returns its reader.

        ``endpoint_url`` is what the daemon talks to (a proxy, say); the reader
        always talks to the server itself.
        """
        name = extra.pop("name", kind)
        extra.setdefault("retry", dict(FAST_RETRY))
        if kind in ("s3", "gcs"):
            # main objects (what the reliability checks list) catch up 1 s after a file is quiet
            extra.setdefault("compact_idle_s", 1.0)
        reader: AnyStorage
        if kind == "s3":
            url = f"s3://{S3_BUCKET}/{self.prefix}/{name}"
            extra["endpoint_url"] = endpoint_url or self.s3_endpoint
            reader = S3Storage(S3_BUCKET, f"{self.prefix}/{name}", endpoint_url=self.s3_endpoint)
        elif kind == "gcs":
            url = f"gs://{GCS_BUCKET}/{self.prefix}/{name}"
            extra["endpoint_url"] = endpoint_url or self.gcs_endpoint
            reader = GCSStorage(GCS_BUCKET, f"{self.prefix}/{name}", endpoint_url=self.gcs_endpoint)
        else:
            url = (self.tmp / f"mirror-{name}").as_uri()
            reader = LocalStorage(self.tmp / f"mirror-{name}")
            extra.pop("retry")
        self.dests.append({"name": name, "url": url, **extra})
        self.readers[name] = reader
        return reader

    def daemon(self, **settings: Any) -> Daemon:
        settings.setdefault("flush_interval_s", 0.1)
        settings.setdefault("stop_timeout_s", 10.0)
        cfg = write_config(self.tmp / "config.toml", self.root, self.state, self.dests, **settings)
        return Daemon(cfg, self.log_path)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


# -- reading destinations ---------------------------------------------------------------


def _s3_client(endpoint: str) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )


def list_keys(reader: AnyStorage, *, internal: bool = False) -> list[str]:
    """Every key under the reader's prefix (relative to it), one paginated listing.

    Args:
        internal: list only the daemon's ``.evalsyncd/`` area instead of the files.
    """
    if isinstance(reader, LocalStorage):
        root = reader.root
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    assert isinstance(reader, S3Storage | GCSStorage)
    base = f"{reader.prefix}/" if reader.prefix else ""
    keys: list[str] = []
    if isinstance(reader, S3Storage):
        assert reader.endpoint_url is not None
        client = _s3_client(reader.endpoint_url)
        try:
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=reader.bucket, Prefix=base
            ):
                keys.extend(o["Key"][len(base) :] for o in page.get("Contents", ()))
        finally:
            client.close()
    else:
        assert reader.endpoint_url is not None
        token = ""
        while True:
            q = {"prefix": base, "maxResults": "1000", "fields": "items(name),nextPageToken"}
            if token:
                q["pageToken"] = token
            url = (
                f"{reader.endpoint_url}/storage/v1/b/{reader.bucket}/o?{urllib.parse.urlencode(q)}"
            )
            with urllib.request.urlopen(url, timeout=30) as resp:
                page = json.load(resp)
            keys.extend(i["name"][len(base) :] for i in page.get("items", ()))
            token = page.get("nextPageToken", "")
            if not token:
                break
    inside = [k for k in keys if k.startswith(".evalsyncd/")]
    return sorted(inside if internal else [k for k in keys if k not in inside])


def snapshot(reader: AnyStorage) -> dict[str, bytes]:
    """Every file of a destination, read through the reader (main object + tail log)."""
    return {k: reader.read(k) for k in list_keys(reader)}


def s3_main_object(reader: S3Storage, path: str) -> bytes:
    """The raw main object of ``path`` (what tools other than evalsyncd see)."""
    assert reader.endpoint_url is not None
    client = _s3_client(reader.endpoint_url)
    try:
        key = f"{reader.prefix}/{path}" if reader.prefix else path
        body: bytes = client.get_object(Bucket=reader.bucket, Key=key)["Body"].read()
        return body
    finally:
        client.close()


def s3_multipart_uploads(reader: S3Storage) -> list[dict[str, Any]]:
    """The multipart uploads in progress under the reader's prefix."""
    assert reader.endpoint_url is not None
    client = _s3_client(reader.endpoint_url)
    try:
        resp = client.list_multipart_uploads(Bucket=reader.bucket, Prefix=reader.prefix + "/")
        return list(resp.get("Uploads", ()))
    finally:
        client.close()


def wait_settled(
    env: RelEnv, timeout_s: float = 90.0, readers: list[str] | None = None
) -> dict[str, dict[str, bytes]]:
    """Wait until every destination (or those named) mirrors the root byte for byte."""
    out: dict[str, dict[str, bytes]] = {}
    for name in readers or list(env.readers):
        reader = env.readers[name]

        def same(reader: AnyStorage = reader) -> dict[str, bytes] | None:
            expected = expected_mirror(env.root)
            actual = snapshot(reader)
            if actual == expected:
                return actual
            missing = sorted(set(expected) - set(actual))[:5]
            extra = sorted(set(actual) - set(expected))[:5]
            differ = sorted(k for k in expected if k in actual and actual[k] != expected[k])[:5]
            raise AssertionError(
                f"{reader.url()}: missing {missing}, extra {extra}, differing {differ}"
            )

        result = wait_for(same, timeout_s=timeout_s, interval_s=0.3, what=f"{name} mirror")
        assert isinstance(result, dict)
        out[name] = result
    return out


def assert_lines_once(mirror: dict[str, bytes], key: str = "n") -> int:
    """Every JSONL line of the mirror parses, and no value of ``key`` repeats; returns the count."""
    seen: list[Any] = []
    for path, data in mirror.items():
        if not path.endswith(".jsonl"):
            continue
        assert data == b"" or data.endswith(b"\n"), f"{path}: partial last line"
        for line in data.splitlines():
            seen.append(json.loads(line)[key])
    assert len(seen) == len(set(seen)), "doubled lines"
    return len(seen)


# -- process memory ----------------------------------------------------------------------


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def daemon_pid(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return daemon.proc.pid


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    """The daemon's log events called ``name``."""
    if not daemon.log_path.exists():
        return []
    return [e for e in daemon.log_events() if e.get("event") == name]


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with one ``write(2)`` (as EvalStore does)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def wait_started(daemon: Daemon, count: int = 1, timeout_s: float = 30.0) -> None:
    """Wait until the daemon log holds ``count`` ``daemon_started`` events."""
    wait_for(
        lambda: len(events(daemon, "daemon_started")) >= count, timeout_s, 0.05, "daemon_started"
    )
