"""The Prometheus endpoint of a real daemon process, scraped over HTTP."""

from __future__ import annotations

import re
import signal
import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from evalsyncd.store import StoredTrajectory
from tests.helpers import wait_for
from tests.opshelpers import DaemonProcess, make_runs, mirror_equals, write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape(url: str) -> dict[str, float]:
    """``{'name{label="v",...}': value}`` of every sample."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_endpoint_reports_uploads_backlog_latency_and_scans(tmp_path: Path) -> None:
    """With metrics_address set, /metrics exposes uploaded bytes/objects, backlog, the latency
    histogram, last success, destination state, rescans and overflows; it is off by default."""
    root, mirror = tmp_path / "root", tmp_path / "mirror"
    root.mkdir()
    store = make_runs(root, runs=1)
    port = _free_port()
    config = write_config(
        tmp_path / "c.toml",
        root,
        tmp_path / "state",
        [{"name": "nfs", "url": mirror.as_uri()}],
        metrics_address=f"127.0.0.1:{port}",
    )
    url = f"http://127.0.0.1:{port}/metrics"
    with DaemonProcess(config, tmp_path / "d.log") as daemon:
        wait_for(lambda: mirror_equals(root, mirror), timeout_s=30, what="mirror")
        store.write_trajectory("run0", "gsm8k", StoredTrajectory(idx=7, benchmark="gsm8k"))
        wait_for(lambda: mirror_equals(root, mirror), timeout_s=30, what="append mirrored")

        def scraped() -> dict[str, float]:
            m = _scrape(url)
            assert m['evalsyncd_uploaded_objects_total{destination="nfs"}'] >= 5, m
            return m

        m = wait_for(scraped, timeout_s=15, what="metrics")
        assert isinstance(m, dict)
        local_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        assert m['evalsyncd_uploaded_bytes_total{destination="nfs"}'] >= local_bytes
        assert m['evalsyncd_backlog_files{destination="nfs"}'] == 0
        assert m['evalsyncd_backlog_bytes{destination="nfs"}'] == 0
        assert m['evalsyncd_destination_state{destination="nfs",state="healthy"}'] == 1
        assert m['evalsyncd_destination_state{destination="nfs",state="parked"}'] == 0
        assert m['evalsyncd_last_success_timestamp_seconds{destination="nfs"}'] > 1.7e9
        assert m['evalsyncd_upload_duration_seconds_count{destination="nfs",op="append"}'] >= 1
        assert m['evalsyncd_upload_duration_seconds_count{destination="nfs",op="write"}'] >= 4
        assert m["evalsyncd_rescans_total{}"] >= 1
        assert m["evalsyncd_inotify_overflows_total{}"] == 0
        assert not any(re.match(r"evalsyncd_upload_failures_total", k) for k in m)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    assert daemon.events("metrics_listening")


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    """Without metrics_address the daemon opens no metrics port and logs no endpoint."""
    root, mirror = tmp_path / "root", tmp_path / "mirror"
    root.mkdir()
    make_runs(root, runs=1)
    config = write_config(
        tmp_path / "c.toml", root, tmp_path / "state", [{"name": "nfs", "url": mirror.as_uri()}]
    )
    with DaemonProcess(config, tmp_path / "d.log") as daemon:
        wait_for(lambda: mirror_equals(root, mirror), timeout_s=30, what="mirror")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    assert daemon.events("daemon_started") and not daemon.events("metrics_listening")
