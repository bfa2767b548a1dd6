"""systemd integration: the unit files, sd_notify, SIGTERM and SIGHUP on a real daemon process."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evalsyncd.store import StoredTrajectory
from evalsyncd.sync.journal import Journal
from tests.helpers import wait_for
from tests.opshelpers import (
    DaemonProcess,
    NotifySocket,
    evalsyncd,
    make_runs,
    mirror_equals,
    write_config,
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _installable_copy(unit: str, tmp_path: Path, name: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's evalsyncd (verify checks it exists)."""
    exe = Path(sys.executable).parent / "evalsyncd"
    assert exe.exists(), exe
    text = (UNITS / unit).read_text().replace("/opt/evalsyncd/bin/evalsyncd", str(exe))
    out = tmp_path / (name or unit)
    out.write_text(text)
    return out


# -- unit files ----------------------------------------------------------------------


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "name"),
    [("evalsyncd.service", None), ("evalsyncd@.service", "evalsyncd@lab.service")],
)
def test_unit_passes_systemd_analyze_verify(unit: str, name: str | None, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (and the template as an instance) without a warning."""
    path = _installable_copy(unit, tmp_path, name)
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@needs_systemd_analyze
def test_unit_hardening_scores_ok(tmp_path: Path) -> None:
    """`systemd-analyze security` rates the unit's exposure at most 2.0 ("OK")."""
    path = _installable_copy("evalsyncd.service", tmp_path)
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    if match is None:
        pytest.skip(f"systemd-analyze security cannot score offline here: {proc.stderr[-300:]}")
    assert float(match.group(1)) <= 2.0, proc.stdout[-2000:]


def test_units_keep_the_operational_contract() -> None:
    """Both units are Type=notify with a watchdog, restart on failure but not on EX_CONFIG,
    run as a dedicated user with a state directory, and never require the network."""
    for unit, config in (
        ("evalsyncd.service", "/etc/evalsyncd/config.toml"),
        ("evalsyncd@.service", "/etc/evalsyncd/%i.toml"),
    ):
        d = _directives((UNITS / unit).read_text())
        assert d["Type"] == ["notify"]
        assert d["WatchdogSec"] and int(d["WatchdogSec"][0]) > 0
        assert d["Restart"] == ["on-failure"]
        assert d["RestartPreventExitStatus"] == ["78"]
        assert d["User"] == ["evalsyncd"]
        assert d["StateDirectory"][0].startswith("evalsyncd")
        assert d["ExecStart"][0].endswith(f"run --config {config}")
        assert d["ProtectSystem"] == ["strict"]
        for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices"):
            assert d[key] == ["yes"], key
        assert d["ProtectHome"] == ["read-only"]  # eval jobs often write under /home
        assert int(d["Nice"][0]) > 0  # writers never wait: the daemon yields the CPU
        for key in ("Requires", "BindsTo", "Requisite"):
            assert not any("network" in v for v in d.get(key, [])), key


def test_template_has_the_same_hardening_as_the_unit() -> None:
    """The template differs from the main unit only in names and paths (no drift)."""
    main = _directives((UNITS / "evalsyncd.service").read_text())
    template = _directives((UNITS / "evalsyncd@.service").read_text())
    differing = {k for k in main.keys() | template.keys() if main.get(k) != template.get(k)}
    assert differing == {"Description", "ExecStart", "StateDirectory"}
    assert template["StateDirectory"] == ["evalsyncd/%i"]


# -- a real daemon under a fake systemd ---------------------------------------------------


@pytest.fixture
def notify_socket() -> NotifySocket:
    sock = NotifySocket()
    yield sock  # type: ignore[misc]
    sock.close()


def test_daemon_speaks_sd_notify_and_stops_cleanly_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """READY, STATUS and WATCHDOG (at $WATCHDOG_USEC/2) arrive; `status` works while it runs;
    SIGTERM sends STOPPING, exits 0 within the stop timeout, and the journal is committed."""
    root, mirror, state = tmp_path / "root", tmp_path / "mirror", tmp_path / "state"
    root.mkdir()
    make_runs(root, runs=2)
    config = write_config(
        tmp_path / "config.toml",
        root,
        state,
        [{"name": "backup", "url": mirror.as_uri()}],
        stop_timeout_s=10.0,
    )
    env = {"NOTIFY_SOCKET": notify_socket.name, "WATCHDOG_USEC": "600000"}  # pings every 0.3 s
    with DaemonProcess(config, tmp_path / "daemon.log", env) as daemon:
        ready = notify_socket.wait_for("READY=1")
        assert daemon.events("daemon_started"), "READY before the daemon started"
        notify_socket.wait_for("STATUS=")
        first = notify_socket.wait_for("WATCHDOG=1", after=ready)
        second = notify_socket.wait_for("WATCHDOG=1", after=first)
        assert second - first < 1.5, "watchdog pings do not follow WATCHDOG_USEC/2"
        wait_for(lambda: mirror_equals(root, mirror), timeout_s=30, what="initial mirror")

        def status_in_sync() -> dict[str, object]:
            status = evalsyncd("status", "--json", "--config", str(config))
            assert status.returncode == 0, status.stderr
            (dest,) = json.loads(status.stdout)["destinations"]
            assert dest["state"] == "healthy", dest
            assert (dest["pending_files"], dest["pending_bytes"]) == (0, 0), dest
            assert dest["last_success"] is not None, dest
            return dest

        wait_for(status_in_sync, timeout_s=15, interval_s=0.3, what="status while running")

        stopped_at = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(15.0) == 0
        assert time.monotonic() - stopped_at < 10.0 + 2.0
        notify_socket.wait_for("STOPPING=1", timeout_s=5)
        assert "STATUS=backup: healthy" in "\n".join(notify_socket.lines())

    with Journal(state / "journal.sqlite3", readonly=True) as journal:
        entries = journal.entries("backup")
    local = {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }
    assert {k: e.acked_offset for k, e in entries.items()} == local


def test_sigterm_while_appending_loses_and_duplicates_nothing(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """SIGTERM mid-stream exits 0 with the journal never ahead of the mirror; a restart
    completes the mirror byte for byte (no lost or repeated line)."""
    root, mirror, state = tmp_path / "root", tmp_path / "mirror", tmp_path / "state"
    root.mkdir()
    store = make_runs(root, runs=1)
    config = write_config(
        tmp_path / "config.toml", root, state, [{"name": "backup", "url": mirror.as_uri()}]
    )
    with DaemonProcess(
        config, tmp_path / "daemon.log", {"NOTIFY_SOCKET": notify_socket.name}
    ) as daemon:
        notify_socket.wait_for("READY=1")
        for i in range(200):
            store.write_trajectory("run0", "math", StoredTrajectory(idx=i, benchmark="math"))
            if i == 100:
                wait_for(
                    lambda: (mirror / "runs/run0/math/trajectories.jsonl").exists(),
                    timeout_s=20,
                    what="appends under way",
                )
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30.0) == 0

    key = "runs/run0/math/trajectories.jsonl"
    with Journal(state / "journal.sqlite3", readonly=True) as journal:
        entry = journal.get("backup", key)
    remote = (mirror / key).read_bytes()
    local = (root / key).read_bytes()
    assert entry is not None and entry.acked_offset <= len(remote)
    assert local.startswith(remote)

    done = evalsyncd("sync", "--once", "--config", str(config), "--timeout", "60")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (mirror / key).read_bytes() == local
    assert len(local.splitlines()) == 200


def test_sighup_adds_and_removes_destinations_without_losing_progress(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """SIGHUP applies a new destination list: an added destination catches up from zero, a
    removed one stops, and one re-added later resumes from its journal offsets (appends only)."""
    root, state = tmp_path / "root", tmp_path / "state"
    a, b = tmp_path / "mirror-a", tmp_path / "mirror-b"
    root.mkdir()
    store = make_runs(root, runs=1)
    key = "runs/run0/gsm8k/trajectories.jsonl"
    dest_a = {"name": "a", "url": a.as_uri()}
    dest_b = {"name": "b", "url": b.as_uri()}
    config = tmp_path / "config.toml"
    write_config(config, root, state, [dest_a], log_level="debug")
    with DaemonProcess(
        config, tmp_path / "daemon.log", {"NOTIFY_SOCKET": notify_socket.name}
    ) as daemon:
        notify_socket.wait_for("READY=1")
        wait_for(lambda: mirror_equals(root, a), timeout_s=30, what="a mirrored")
        a_mtime = (a / "runs/run0/metadata.json").stat().st_mtime_ns

        write_config(config, root, state, [dest_a, dest_b], log_level="debug")  # add b
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: mirror_equals(root, b), timeout_s=30, what="b caught up after reload")
        assert (a / "runs/run0/metadata.json").stat().st_mtime_ns == a_mtime, "a re-uploaded"

        write_config(config, root, state, [dest_b], log_level="debug")  # remove a
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: daemon.events("destination_removed"), timeout_s=20, what="a removed")
        store.write_trajectory("run0", "gsm8k", StoredTrajectory(idx=99, benchmark="gsm8k"))
        wait_for(lambda: mirror_equals(root, b), timeout_s=30, what="b follows")
        assert not mirror_equals(root, a)

        offset_before = len((a / key).read_bytes())
        write_config(config, root, state, [dest_a, dest_b], log_level="debug")  # a comes back
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: mirror_equals(root, a), timeout_s=30, what="a resumed")
        uploads = [
            e
            for e in daemon.events("upload_succeeded")
            if e["destination"] == "a" and e["key"] == key
        ]
        assert uploads[-1]["op"] == "append" and uploads[-1]["start"] == offset_before
        assert sum(1 for e in uploads if e["start"] == 0) == 1, "a rewrote the file from zero"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30.0) == 0
    assert notify_socket.wait_for("STOPPING=1", timeout_s=5)
