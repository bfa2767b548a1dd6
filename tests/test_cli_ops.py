"""`evalsyncd status`, `verify` and `runs ls|show` against real mirrors (local directory, GCS, S3)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from evalsyncd.config import load_settings
from evalsyncd.status import collect_status
from evalsyncd.storage import GCSStorage
from evalsyncd.store import StoredTrajectory
from evalsyncd.testing.servers import SeaweedS3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET
from tests.opshelpers import evalsyncd, make_runs, write_config


@pytest.fixture
def synced(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A root with two runs mirrored once to a local directory: (config, root, mirror)."""
    root, mirror = tmp_path / "root", tmp_path / "mirror"
    root.mkdir()
    make_runs(root, runs=2)
    config = write_config(
        tmp_path / "config.toml",
        root,
        tmp_path / "state",
        [{"name": "nfs", "url": mirror.as_uri()}],
    )
    done = evalsyncd("sync", "--once", "--config", str(config))
    assert done.returncode == 0, done.stderr[-2000:]
    return config, root, mirror


# -- status ---------------------------------------------------------------------------


def test_status_counts_pending_files_bytes_and_age(synced: tuple[Path, Path, Path]) -> None:
    """After new complete lines, a new file and a partial line, status reports exactly the
    complete bytes pending (the partial line is not pending) and an age for the oldest."""
    config, root, _mirror = synced
    settings = load_settings(config)
    clean = collect_status(settings)
    (dest,) = clean.destinations
    assert (dest.state, dest.pending_files, dest.pending_bytes) == ("healthy", 0, 0)
    assert dest.last_success is not None and dest.oldest_unsynced_s is None

    traj = root / "runs/run0/gsm8k/trajectories.jsonl"
    with traj.open("ab") as f:
        f.write(b'{"idx": 10}\n{"idx": 11}\n{"idx"')  # two complete lines, one partial
    new = root / "runs/run1/notes.txt"
    new.write_bytes(b"x" * 1000)
    old = time.time() - 3600
    os.utime(new, (old, old))
    partial_only = root / "runs/run1/gsm8k/trajectories.jsonl"
    with partial_only.open("ab") as f:
        f.write(b'{"idx": 99')

    (dest,) = collect_status(settings).destinations
    assert dest.pending_files == 2
    assert dest.pending_bytes == len(b'{"idx": 10}\n{"idx": 11}\n') + 1000
    assert dest.oldest_unsynced_s is not None and dest.oldest_unsynced_s >= 3500


def test_status_cli_text_and_json_before_the_daemon_ever_ran(tmp_path: Path) -> None:
    """With no journal yet, status exits 0, says so, and counts every file as pending."""
    root = tmp_path / "root"
    root.mkdir()
    make_runs(root, runs=1)
    config = write_config(
        tmp_path / "c.toml",
        root,
        tmp_path / "state",
        [{"name": "x", "url": (tmp_path / "m").as_uri()}],
    )
    text = evalsyncd("status", "--config", str(config))
    assert text.returncode == 0, text.stderr
    assert "the daemon has not run" in text.stdout and "x (file://" in text.stdout
    data = json.loads(evalsyncd("status", "--json", "--config", str(config)).stdout)
    (dest,) = data["destinations"]
    assert dest["state"] == "unknown" and dest["pending_files"] == data["files"] > 0


def test_status_takes_the_config_from_evalsyncd_config(synced: tuple[Path, Path, Path]) -> None:
    """EVALSYNCD_CONFIG works like --config for status."""
    config, _root, _mirror = synced
    out = evalsyncd("status", "--json", env={"EVALSYNCD_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["destinations"][0]["name"] == "nfs"


# -- verify ---------------------------------------------------------------------------


def test_verify_passes_on_a_true_mirror_and_names_each_kind_of_mismatch(
    synced: tuple[Path, Path, Path],
) -> None:
    """verify exits 0 on an exact mirror (a local partial line is not required remotely), and 1
    with one line per mismatch: content changed at equal size, remote behind, remote missing."""
    config, root, mirror = synced
    with (root / "runs.jsonl").open("ab") as f:
        f.write(b'{"partial')
    ok = evalsyncd("verify", "--config", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout

    meta = mirror / "runs/run0/metadata.json"
    meta.write_bytes(meta.read_bytes().replace(b"model", b"MODEL"))
    traj = mirror / "runs/run1/gsm8k/trajectories.jsonl"
    lines = traj.read_bytes().splitlines(keepends=True)
    traj.write_bytes(b"".join(lines[:2]))
    (mirror / "runs/run1/gsm8k/result.json").unlink()

    bad = evalsyncd("verify", "--config", str(config), "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    found = {(m["path"], m["problem"]) for m in map(json.loads, bad.stdout.splitlines())}
    assert found == {
        ("runs/run0/metadata.json", "content"),
        ("runs/run1/gsm8k/trajectories.jsonl", "behind"),
        ("runs/run1/gsm8k/result.json", "missing"),
    }


def test_verify_rejects_an_unknown_destination(synced: tuple[Path, Path, Path]) -> None:
    """--destination with a name not in the config is a usage error (exit 2) naming the known ones."""
    config, _root, _mirror = synced
    out = evalsyncd("verify", "--config", str(config), "--destination", "nope")
    assert out.returncode == 2 and "nfs" in out.stderr


def test_verify_and_runs_on_gcs(
    tmp_path: Path, cloud_env: dict[str, str], unique_prefix: str
) -> None:
    """On GCS: sync, verify OK by the stored CRC32C (composed objects included); `runs ls/show
    gs://` read the runs back; a tampered object of the same size is a content mismatch."""
    root = tmp_path / "root"
    root.mkdir()
    make_runs(root, runs=2)
    url = f"gs://{GCS_BUCKET}/{unique_prefix}"
    config = write_config(
        tmp_path / "c.toml", root, tmp_path / "state", [{"name": "gcs", "url": url}]
    )
    assert evalsyncd("sync", "--once", "--config", str(config)).returncode == 0
    ok = evalsyncd("verify", "--config", str(config), "--destination", "gcs")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "(7 by crc32c)" in ok.stdout, ok.stdout  # GCS keeps a CRC32C: no download

    ls = evalsyncd("runs", "ls", url, "--json")
    assert ls.returncode == 0, ls.stderr
    assert [r["run_id"] for r in json.loads(ls.stdout)] == ["run1", "run0"]
    show = evalsyncd("runs", "show", url, "run0")
    assert show.returncode == 0, show.stderr
    assert "gsm8k: score 0.400 (2/5 correct, 0 errors), 5 trajectories" in show.stdout
    by_name = evalsyncd("runs", "show", "gcs", "run1", "--config", str(config), "--json")
    assert json.loads(by_name.stdout)["benchmarks"]["gsm8k"]["trajectories"] == 5

    with GCSStorage(GCS_BUCKET, unique_prefix) as gcs:
        data = gcs.read("runs/run0/metadata.json")
        gcs.write("runs/run0/metadata.json", data.replace(b"model", b"MODEL"))
    bad = evalsyncd("verify", "--config", str(config), "--json")
    assert bad.returncode == 1
    (mismatch,) = map(json.loads, bad.stdout.splitlines())
    assert (mismatch["path"], mismatch["problem"]) == ("runs/run0/metadata.json", "content")


def test_runs_ls_reports_missing_run_and_outage_as_errors(tmp_path: Path) -> None:
    """`runs show` of a missing run exits 1 with a message; `runs ls` of an empty dir says so."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = evalsyncd("runs", "ls", str(empty))
    assert out.returncode == 0 and out.stdout.strip() == "no runs"
    missing = evalsyncd("runs", "show", str(empty), "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_runs_and_verify_on_s3(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3 (SeaweedFS): sync, verify OK, `runs ls s3://` lists the runs; a trajectory
    appended after the sync shows as `behind`."""
    root = tmp_path / "root"
    root.mkdir()
    store = make_runs(root, runs=2)
    url = f"s3://{S3_BUCKET}/{unique_prefix}"
    config = write_config(
        tmp_path / "c.toml", root, tmp_path / "state", [{"name": "s3", "url": url}]
    )
    done = evalsyncd("sync", "--once", "--config", str(config))
    assert done.returncode == 0, done.stderr[-2000:]
    ok = evalsyncd("verify", "--config", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ls = evalsyncd("runs", "ls", url, "--json")
    assert ls.returncode == 0, ls.stderr
    assert [r["run_id"] for r in json.loads(ls.stdout)] == ["run1", "run0"]

    store.write_trajectory("run0", "gsm8k", StoredTrajectory(idx=50, benchmark="gsm8k"))
    bad = evalsyncd("verify", "--config", str(config), "--json")
    assert bad.returncode == 1
    (mismatch,) = map(json.loads, bad.stdout.splitlines())
    assert (mismatch["path"], mismatch["problem"]) == (
        "runs/run0/gsm8k/trajectories.jsonl",
        "behind",
    )


def test_a_file_that_cannot_be_mirrored_fails_sync_once_and_shows_in_status(
    tmp_path: Path, cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> None:
    """On S3: a file whose name holds bytes that are not UTF-8 (no valid key) makes
    `sync --once` exit 1 naming it and why, though everything else is mirrored; `status`
    lists it apart (never "pending" forever); renamed, it mirrors and both are clean."""
    root = tmp_path / "root"
    root.mkdir()
    make_runs(root, runs=1)
    bad = os.fsencode(root / "runs/run0/gsm8k") + b"/bad\xff\xfeutf8.jsonl"
    with open(bad, "wb") as f:
        f.write(b'{"k": 1}\n')
    url = f"s3://{S3_BUCKET}/{unique_prefix}"
    config = write_config(
        tmp_path / "c.toml", root, tmp_path / "state", [{"name": "s3", "url": url}]
    )
    done = evalsyncd("sync", "--once", "--config", str(config))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "sync_incomplete_not_mirrorable" in done.stderr
    assert "runs/run0/gsm8k/bad\\\\xff\\\\xfeutf8.jsonl" in done.stderr  # JSON-escaped
    assert "not valid UTF-8" in done.stderr
    status = evalsyncd("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert "not mirrorable: 1 files" in status.stdout
    assert "runs/run0/gsm8k/bad\\xff\\xfeutf8.jsonl: not valid UTF-8" in status.stdout
    assert "pending: nothing, in sync" in status.stdout
    report = json.loads(evalsyncd("status", "--config", str(config), "--json").stdout)
    assert report["not_mirrorable"] == {
        "runs/run0/gsm8k/bad\\xff\\xfeutf8.jsonl": "not valid UTF-8"
    }

    os.rename(bad, root / "runs/run0/gsm8k/renamed.jsonl")
    assert evalsyncd("sync", "--once", "--config", str(config)).returncode == 0
    assert "not mirrorable" not in evalsyncd("status", "--config", str(config)).stdout
