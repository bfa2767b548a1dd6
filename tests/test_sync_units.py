"""Pure parts of the daemon: classification, phases, backoff, journal, configuration."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from evalsyncd.cli import EX_CONFIG, main
from evalsyncd.config import DestinationSettings, RetrySettings, load_settings
from evalsyncd.errors import ConfigError
from evalsyncd.storage import LocalStorage
from evalsyncd.sync import (
    Destination,
    Entry,
    FileKind,
    Journal,
    JournalError,
    backoff_delay,
    classify,
    phase_of,
    scan_tree,
)
from evalsyncd.sync.files import open_beneath
from evalsyncd.sync.plan import other_fs

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("runs.jsonl", FileKind.APPEND),
        ("runs/r1/gsm8k/trajectories.jsonl", FileKind.APPEND),
        ("runs/r1/metadata.json", FileKind.REPLACE),
        ("runs/r1/notes.txt", FileKind.REPLACE),
        ("runs/r1/.metadata.json.1234.tmp", FileKind.IGNORED),
        ("runs/.hidden/x.json", FileKind.IGNORED),
        ("runs/r1/x.json.tmp", FileKind.IGNORED),
        ("runs/r1/x.json~", FileKind.IGNORED),
        ("runs/r1/.x.swp", FileKind.IGNORED),
    ],
)
def test_classify(path: str, kind: FileKind) -> None:
    """File kinds follow docs/design.md ("The object model"): *.jsonl append, temporaries ignored, the rest replace."""
    assert classify(path) is kind


@pytest.mark.parametrize(
    ("path", "phase"),
    [
        ("runs/r1/gsm8k/result.json", 0),
        ("runs/r1/gsm8k/trajectories.jsonl", 0),
        ("runs/r1/metadata.json", 1),
        ("runs/r1/summary.json", 1),
        ("runs.jsonl", 2),
        ("other/metadata.json", 0),
    ],
)
def test_phases_order_data_before_metadata_before_index(path: str, phase: int) -> None:
    """Results and trajectories come before run metadata, and the index comes last."""
    assert phase_of(path) == phase


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [
        (1, 0.25, 0.5),
        (2, 0.5, 1.0),
        (3, 1.0, 2.0),
        (7, 16.0, 32.0),
        (8, 30.0, 60.0),
        (50, 30.0, 60.0),
        (10_000, 30.0, 60.0),
    ],
)
def test_backoff_delay_is_capped_exponential_with_jitter(
    failures: int, low: float, high: float
) -> None:
    """The n-th failure waits within [cap/2, cap], cap = min(60, 0.5 * 2**(n-1))."""
    retry = RetrySettings()
    rng = random.Random(1234)
    delays = [backoff_delay(failures, retry, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert len(set(delays)) > 100  # jittered


def test_scan_tree_skips_symlinks_temporaries_and_excluded(tmp_path: Path) -> None:
    """The scanner yields regular files only, never follows symlinks, skips the state dir."""
    root = tmp_path / "root"
    (root / "runs/r1").mkdir(parents=True)
    (root / "runs/r1/metadata.json").write_text("{}")
    (root / "runs/r1/.metadata.json.99.tmp").write_text("{")
    (root / "state").mkdir()
    (root / "state/journal.sqlite3").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text("{}")
    (root / "link").symlink_to(outside)
    (root / "runs/r1/linkfile.json").symlink_to(outside / "secret.json")
    found = sorted(rel for rel, _ in scan_tree(root, (root / "state",)))
    assert found == ["runs/r1/metadata.json"]


def _entry(path: str, offset: int = 10) -> Entry:
    return Entry("d", path, 1, 2, offset, 123, None, "etag", offset, 5, "ok", 1.0)


def test_journal_roundtrip_and_persistence(tmp_path: Path) -> None:
    """Acknowledged entries survive closing and reopening the journal."""
    root = tmp_path / "root"
    with Journal(tmp_path / "j.sqlite3", root) as j:
        j.ack(_entry("a.jsonl"))
        j.ack(_entry("a.jsonl", 20))
        j.ack(_entry("b.json"))
        j.set_destination_state("d", "backoff", error="TransientStorageError: boom")
    with Journal(tmp_path / "j.sqlite3", root) as j:
        assert j.get("d", "a.jsonl") == _entry("a.jsonl", 20)
        assert set(j.entries("d")) == {"a.jsonl", "b.json"}
        rec = j.destinations()["d"]
        assert rec.state == "backoff" and rec.last_error == "TransientStorageError: boom"
        j.forget("d", "b.json")
        assert j.get("d", "b.json") is None


def test_journal_rows_of_many_paths_are_those_of_get(tmp_path: Path) -> None:
    """``rows`` answers as ``get`` for each path, across its queries of 500 paths: rows of
    this destination only, absent paths left out, odd characters as they are."""
    with Journal(tmp_path / "j.sqlite3", tmp_path / "root") as j:
        paths = [f"runs/r{i:04d}/t '%_?.jsonl" for i in range(1201)]
        for path in paths[::3]:
            j.ack(_entry(path, 7))
        j.ack(replace(_entry(paths[1]), destination="other"))
        rows = j.rows("d", paths)
        assert rows == {p: e for p in paths if (e := j.get("d", p)) is not None}
        assert len(rows) == 401 and paths[1] not in rows
        assert j.rows("d", []) == {}
        undecodable = os.fsdecode(b"runs/r/bad\xff\xfe.jsonl")  # a name that is no UTF-8
        assert j.rows("d", [undecodable, paths[0]]) == {paths[0]: rows[paths[0]]}


def test_journal_refuses_another_root(tmp_path: Path) -> None:
    """A state directory belongs to one root: sharing it by mistake is a clear error."""
    Journal(tmp_path / "j.sqlite3", tmp_path / "root-a").close()
    with pytest.raises(JournalError, match="belongs to root"):
        Journal(tmp_path / "j.sqlite3", tmp_path / "root-b")


def test_journal_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    """A corrupt journal raises JournalError naming the file, not a raw sqlite error."""
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match=r"j\.sqlite3"):
        Journal(path, tmp_path)
    assert not isinstance(JournalError("x"), sqlite3.Error)


def test_example_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.example.toml documents a valid configuration (root and state_dir overridden)."""
    (tmp_path / "root").mkdir()
    settings = load_settings(
        REPO / "config.example.toml", root=tmp_path / "root", state_dir=tmp_path / "state"
    )
    assert [d.name for d in settings.destinations] == ["s3", "gcs"]
    assert settings.flush_interval_s == 1.0
    assert "{hostname}" not in settings.destinations[0].url


def test_env_overrides_file_and_nested_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Environment beats the TOML file; __ reaches nested keys."""
    (tmp_path / "root").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'root = "{tmp_path / "root"}"\nstate_dir = "{tmp_path / "s"}"\nflush_interval_s = 3\n'
        '[[destinations]]\nname = "m"\nurl = "file:///tmp/x"\n'
    )
    monkeypatch.setenv("EVALSYNCD_FLUSH_INTERVAL_S", "7")
    monkeypatch.setenv("EVALSYNCD_CONFIG", str(cfg))
    assert load_settings().flush_interval_s == 7.0
    assert load_settings(flush_interval_s=9).flush_interval_s == 9.0


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("flush_interval_s = 1\n", "destinations"),
        ("unknown_key = 1\n", "unknown_key: unknown key"),
        ('flush_interval_s = "soon"\n', "flush_interval_s"),
        ("flush_interval_s = -1\n", "flush_interval_s"),
        ('[[destinations]]\nname = "x"\nurl = "ftp://h/p"\n', "destinations.0.url"),
        (
            '[[destinations]]\nname = "x"\nurl = "s3://b"\nmax_concurrency = 0\n',
            "destinations.0.max_concurrency",
        ),
        (
            '[[destinations]]\nname = "x"\nurl = "s3://b"\n[[destinations]]\nname = "x"\nurl = "gs://b"\n',
            "unique",
        ),
        (
            '[[destinations]]\nname = "x"\nurl = "s3://b"\n[destinations.retry]\nbogus = 1\n',
            "destinations.0.retry.bogus",
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, body: str, key: str) -> None:
    """Each invalid setting yields a ConfigError naming the file and the key."""
    (tmp_path / "root").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'root = "{tmp_path / "root"}"\nstate_dir = "{tmp_path / "s"}"\n{body}')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert str(cfg) in str(info.value)
    assert key in str(info.value)


def test_missing_root_and_bad_toml_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI exits with EX_CONFIG (78) and one clear message for a bad configuration."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('root = "/does/not/exist"\n[[destinations]]\nname="x"\nurl="file:///tmp/x"\n')
    assert (
        main(["sync", "--once", "--config", str(cfg), "--state-dir", str(tmp_path / "s")])
        == EX_CONFIG
    )
    assert "root" in capsys.readouterr().err
    cfg.write_text("root = [unclosed\n")
    assert main(["run", "--config", str(cfg)]) == EX_CONFIG
    assert "c.toml" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == EX_CONFIG


def test_unwritable_state_dir_exits_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state_dir that cannot be created is a configuration error naming state_dir."""
    (tmp_path / "root").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(
        [
            "sync",
            "--once",
            "--root",
            str(tmp_path / "root"),
            "--to",
            str(tmp_path / "m"),
            "--state-dir",
            str(blocker / "sub"),
        ]
    )
    assert code == EX_CONFIG
    assert "state_dir" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    """`python -m evalsyncd --version` works (the systemd unit and tests use it)."""
    out = subprocess.run(
        [sys.executable, "-m", "evalsyncd", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("evalsyncd ")


class _RecordingStorage(LocalStorage):
    """A real LocalStorage that also records the order of writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.order: list[str] = []

    async def awrite(self, path: str, data: bytes) -> str | None:
        self.order.append(path)
        return await super().awrite(path, data)

    async def aappend(self, path: str, data: bytes, *, offset: int | None = None) -> str | None:
        self.order.append(path)
        return await super().aappend(path, data, offset=offset)


def test_pass_uploads_data_before_metadata_before_index(tmp_path: Path) -> None:
    """Within a pass, results and trajectories precede metadata/summary, and runs.jsonl is last."""
    root = tmp_path / "root"
    files = {
        "runs.jsonl": b'{"run_id": "r1"}\n',
        "runs/r1/metadata.json": b"{}",
        "runs/r1/summary.json": b"{}",
        "runs/r1/gsm8k/result.json": b"{}",
        "runs/r1/gsm8k/trajectories.jsonl": b"{}\n",
        "runs/r2/metadata.json": b"{}",
        "runs/r2/math/trajectories.jsonl": b"{}\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    storage = _RecordingStorage(tmp_path / "mirror")

    async def scenario() -> None:
        with Journal(tmp_path / "j.sqlite3", root) as journal:
            dest = Destination(
                DestinationSettings(name="m", url=storage.url()),
                storage,
                journal,
                root,
                flush_interval_s=0.01,
            )
            for rel in files:
                dest.mark(rel)
            assert await dest.run_pass()
            assert dest.is_idle()

    asyncio.run(scenario())
    # the run catalog follows the metadata it lists
    assert storage.order[-1] == ".evalsyncd/catalog.json"
    order = storage.order[:-1]
    assert sorted(order) == sorted(files)
    rank = {p: i for i, p in enumerate(order)}
    for data in (
        "runs/r1/gsm8k/result.json",
        "runs/r1/gsm8k/trajectories.jsonl",
        "runs/r2/math/trajectories.jsonl",
    ):
        assert rank[data] < min(
            rank["runs/r1/metadata.json"],
            rank["runs/r2/metadata.json"],
            rank["runs/r1/summary.json"],
        )
    assert rank["runs.jsonl"] == len(files) - 1


def test_logs_never_show_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    """Signed-URL queries, secret keys and bearer tokens are masked in every log line."""
    import structlog

    from evalsyncd.logs import configure_logging

    configure_logging("json", "info")
    try:
        log = structlog.get_logger("test")
        log.error(
            "upload_failed",
            url="https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAXXX%2F2026&X-Amz-Signature=deadbeef",
            error="aws_secret_access_key=wJalrXUtnFEMI/K7MDENG header Authorization: Bearer ya29.secret-token",
        )
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
        import logging

        logging.getLogger().handlers.clear()
    assert "deadbeef" not in err and "AKIAXXX" not in err
    assert "wJalrXUtnFEMI" not in err and "ya29.secret-token" not in err
    assert "upload_failed" in err


def test_console_logs_escape_what_a_file_name_or_bucket_holds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A file name holding a newline and terminal escapes is one escaped field of one
    console line: it can neither forge a log line nor move the cursor. A traceback keeps
    its lines; an exception's message has its escapes shown, not obeyed."""
    import logging

    import structlog

    from evalsyncd.logs import configure_logging

    configure_logging("console", "info")
    try:
        log = structlog.get_logger("test")
        log.warning("upload_failed", key="runs/r/a\nfake_event level=error\x1b[2K\x07.jsonl")
        log.warning("runs/r/\x1b]0;pwned\x07\nfake_event")  # a library's message
        log.warning("upload_failed", key="runs/r/\x1b[2K")  # no space: printed bare before
        try:
            raise ValueError("boom: runs/r/\x1b[2K\x07.json")
        except ValueError:
            log.exception("pass_failed")
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    first, second, third, *rest = err.splitlines()
    assert "upload_failed" in first and "\\nfake_event level=error\\x1b[2K\\x07" in first
    assert "runs/r/\\x1b]0;pwned\\x07\\nfake_event" in second
    assert "key='runs/r/\\x1b[2K'" in third
    assert "\x1b" not in err and "\x07" not in err
    assert not any("fake_event" in line for line in rest)
    assert "pass_failed" in rest[0] and "Traceback" in err
    assert "ValueError: boom: runs/r/\\x1b[2K\\x07.json" in err


def test_byte_budget_bounds_bytes_in_flight() -> None:
    """Uploads never hold more than the budget at once; an oversized one runs alone."""
    from evalsyncd.sync.passes import ByteBudget as _ByteBudget

    budget = _ByteBudget(100)
    held = 0
    peak = 0

    async def use(n: int) -> None:
        nonlocal held, peak
        async with budget.hold(n):
            held += min(n, 100)
            peak = max(peak, held)
            await asyncio.sleep(0.001)
            held -= min(n, 100)

    async def main() -> None:
        await asyncio.gather(*(use(n) for n in [30, 40, 50, 250, 10, 60, 0, 100]))

    asyncio.run(main())
    assert peak <= 100
    assert budget.free == 100


def test_watcher_hints_writes_not_reads(tmp_path: Path) -> None:
    """With its event filter (inotify mask), the native watcher still hints writes,
    creations, renames, deletions and new directories, and never reads."""

    async def scenario() -> None:
        from evalsyncd.sync.watcher import Watcher

        quiet = tmp_path / "read-only.jsonl"
        quiet.write_bytes(b"old\n")
        hints: list[tuple[str, bool, str]] = []
        loop = asyncio.get_running_loop()
        watcher = Watcher(tmp_path, loop, lambda *h: hints.append(h), lambda: None, lambda _m: None)
        assert watcher.start()
        try:
            assert quiet.read_bytes() == b"old\n"  # opened, read, closed: no write
            (tmp_path / "a.jsonl").write_bytes(b"x\n")
            (tmp_path / "sub").mkdir()
            (tmp_path / "a.jsonl").rename(tmp_path / "b.jsonl")
            (tmp_path / "b.jsonl").unlink()
            (tmp_path / "last.json").write_bytes(b"{}")

            async def seen(path: Path) -> None:
                for _ in range(600):
                    if any(h[0] == str(path) for h in hints):
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError(f"no hint for {path}: {hints}")

            await seen(tmp_path / "last.json")  # events arrive in order: the rest came before
            for path in ("a.jsonl", "b.jsonl", "sub"):
                await seen(tmp_path / path)
            assert (str(tmp_path / "sub"), True, "created") in hints
            assert not any(h[0] == str(quiet) for h in hints), hints
            assert not any(h[1] and h[0] == str(tmp_path) for h in hints), hints
        finally:
            watcher.stop()

    asyncio.run(scenario())


def test_open_beneath_follows_no_symlink_below_the_root(tmp_path: Path) -> None:
    """A file is opened beneath the root: the root may be a symlink (as configured), a
    directory or the file below it may not (a run swapped for a link to elsewhere)."""
    real = tmp_path / "real"
    (real / "runs/r/g").mkdir(parents=True)
    (real / "runs/r/g/t.jsonl").write_bytes(b"mine\n")
    outside = tmp_path / "outside"
    (outside / "g").mkdir(parents=True)
    (outside / "g/t.jsonl").write_bytes(b"secret\n")
    link = tmp_path / "root-link"
    link.symlink_to(real)

    def read(root: Path, path: str) -> bytes:
        fd = open_beneath(root, path)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    assert read(real, "runs/r/g/t.jsonl") == read(link, "runs/r/g/t.jsonl") == b"mine\n"
    os.rename(real / "runs/r", tmp_path / "aside")
    (real / "runs/r").symlink_to(outside)
    with pytest.raises(OSError) as raised:
        read(link, "runs/r/g/t.jsonl")
    assert raised.value.errno in (errno.ENOTDIR, errno.ELOOP)
    (real / "runs/r").unlink()
    (real / "runs/r/g").mkdir(parents=True)
    (real / "runs/r/g/t.jsonl").symlink_to(outside / "g/t.jsonl")
    with pytest.raises(OSError) as raised:
        read(real, "runs/r/g/t.jsonl")
    assert raised.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        read(real, "runs/r/missing.json")


def test_a_file_gone_with_its_file_system_is_told_from_a_deleted_one(tmp_path: Path) -> None:
    """other_fs: the nearest directory above a missing file is on another device than the
    one the file was seen on (a volume unmounted, or mounted over its directory)."""
    (tmp_path / "runs/r").mkdir(parents=True)
    here = os.stat(tmp_path).st_dev
    elsewhere = os.stat("/proc").st_dev
    assert here != elsewhere
    assert not other_fs(tmp_path, "runs/r/g/t.jsonl", here)  # deleted, with its directory
    assert other_fs(tmp_path, "runs/r/g/t.jsonl", elsewhere)
    (tmp_path / "runs/x").symlink_to(tmp_path / "runs/r")  # a symlink is not a directory here
    assert not other_fs(tmp_path, "runs/x/t.jsonl", here)
