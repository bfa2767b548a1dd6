"""Test harness: run ``evalsyncd`` as a real subprocess and compare mirrors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

from evalsyncd.storage import AnyStorage, LocalStorage
from evalsyncd.sync.files import FileKind, classify, scan_tree
from tests.helpers import wait_for


def write_config(
    path: Path, root: Path, state_dir: Path, destinations: list[dict[str, Any]], **extra: Any
) -> Path:
    """Write a TOML config file for the daemon; returns ``path``."""
    lines = [
        f"root = {json.dumps(str(root))}",
        f"state_dir = {json.dumps(str(state_dir))}",
        'log_format = "json"',
    ]
    for key, value in {"flush_interval_s": 0.2, "rescan_interval_s": 5.0, **extra}.items():
        lines.append(f"{key} = {json.dumps(value)}")
    for dest in destinations:
        lines.append("[[destinations]]")
        retry = dest.get("retry")
        for key, value in dest.items():
            if key != "retry":
                lines.append(f"{key} = {json.dumps(value)}")
        if retry:
            lines.append("[destinations.retry]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in retry.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """``python -m evalsyncd run --config PATH`` in its own process group."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evalsyncd", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_events(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines, parsed (other lines skipped)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def expected_mirror(root: Path) -> dict[str, bytes]:
    """What a mirror of ``root`` must hold: JSONL cut after its last newline."""
    out = {}
    for rel, _ in scan_tree(root):
        data = (root / rel).read_bytes()
        if classify(rel) is FileKind.APPEND:
            data = data[: data.rfind(b"\n") + 1]
        out[rel] = data
    return out


def remote_tree(storage: AnyStorage, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``prefix`` of a storage (hidden names skipped).

    A local mirror is walked on disk; an object store is listed and read
    concurrently through its async API (a name whose ``stat`` is ``None`` is a
    "directory" prefix).
    """
    if isinstance(storage, LocalStorage):
        base = storage.root / prefix if prefix else storage.root
        out = {}
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(storage.root).as_posix()
            if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = path.read_bytes()
        return out

    async def walk() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        sem = asyncio.Semaphore(32)

        async def visit(dir_key: str) -> None:
            async with sem:
                names = await storage.alist_dir(dir_key)
            await asyncio.gather(
                *(entry(f"{dir_key}/{n}" if dir_key else n) for n in names if not n.startswith("."))
            )

        async def entry(key: str) -> None:
            async with sem:
                st = await storage.astat(key)
                if st is not None:
                    found[key] = await storage.aread(key)
                    return
            await visit(key)

        try:
            await visit(prefix)
        finally:
            await storage.aclose()
        return dict(sorted(found.items()))

    return asyncio.run(walk())


def read_keys(storage: AnyStorage, keys: list[str]) -> dict[str, bytes | None]:
    """Read the given keys concurrently; ``None`` for a missing one."""

    async def run() -> dict[str, bytes | None]:
        sem = asyncio.Semaphore(32)

        async def one(key: str) -> bytes | None:
            async with sem:
                try:
                    return await storage.aread(key)
                except FileNotFoundError:
                    return None

        try:
            values = await asyncio.gather(*(one(k) for k in keys))
        finally:
            await storage.aclose()
        return dict(zip(keys, values, strict=True))

    return asyncio.run(run())


def wait_mirrored(
    root: Path, storage: AnyStorage, timeout_s: float = 60.0, *, list_limit: int = 300
) -> dict[str, bytes]:
    """Wait until ``storage`` mirrors ``root`` byte for byte; returns the mirror.

    Every expected key is read back; for trees of at most ``list_limit`` files the
    remote is also listed, to prove it holds nothing more (listing is slow on
    fake-gcs-server, whose listing cost grows with the whole bucket).
    """

    def same() -> dict[str, bytes] | None:
        expected = expected_mirror(root)
        actual = read_keys(storage, sorted(expected))
        missing = sorted(k for k, v in actual.items() if v is None)[:5]
        differ = sorted(k for k, v in actual.items() if v is not None and v != expected[k])[:5]
        if missing or differ:
            raise AssertionError(f"{storage.url()}: missing {missing}, differing {differ}")
        if len(expected) <= list_limit:
            extra = sorted(set(remote_tree(storage)) - set(expected))
            assert not extra, f"{storage.url()}: unexpected objects {extra[:5]}"
        return expected

    result = wait_for(
        same, timeout_s=timeout_s, interval_s=0.2, what=f"mirror of {root} in {storage.url()}"
    )
    assert isinstance(result, dict)
    return result
