"""Helpers of the operations tests: configs, a daemon subprocess, its systemd notifications."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from evalsyncd.store import BenchmarkResult, EvalStore, StoredTrajectory
from tests.daemon import Daemon
from tests.daemon import write_config as daemon_config


def write_config(
    path: Path,
    root: Path,
    state_dir: Path,
    destinations: list[dict[str, Any]],
    **extra: Any,
) -> Path:
    """The shared config writer, with rare rescans (30 s) unless told otherwise."""
    return daemon_config(
        path, root, state_dir, destinations, **{"rescan_interval_s": 30.0, **extra}
    )


def make_runs(root: Path, runs: int = 2, trajectories: int = 5) -> EvalStore:
    """Write ``runs`` finalized runs with one benchmark each into ``root``."""
    store = EvalStore(root)
    for r in range(runs):
        run_id = store.create_run("model", ["gsm8k"], checkpoint_name=f"step{r}", run_id=f"run{r}")
        for i in range(trajectories):
            store.write_trajectory(
                run_id, "gsm8k", StoredTrajectory(idx=i, benchmark="gsm8k", reward=float(i % 2))
            )
        store.write_result(
            run_id,
            BenchmarkResult(
                name="gsm8k",
                score=0.4,
                num_examples=trajectories,
                num_correct=trajectories // 2,
            ),
        )
        store.finalize_run(run_id)
    return store


def evalsyncd(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m evalsyncd ARGS`` to completion; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "evalsyncd", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )


class NotifySocket:
    """An ``AF_UNIX`` datagram socket in the abstract namespace, as systemd's ``NOTIFY_SOCKET``,
    drained by a reader thread (like systemd, it never lets the sender's queue fill up)."""

    def __init__(self) -> None:
        self.name = f"@evalsyncd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append((time.monotonic(), data.decode()))
                self._cond.notify_all()

    def wait_for(self, line: str, timeout_s: float = 30.0, after: float = 0.0) -> float:
        """Wait for a message equal to ``line`` (or starting with it, when it ends in ``=``)
        that arrived later than ``after`` (monotonic); returns its arrival time."""

        def found() -> float | None:
            for t, msg in self.messages:
                if t > after and (msg == line or (line.endswith("=") and msg.startswith(line))):
                    return t
            return None

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None, timeout_s):
                raise AssertionError(f"no {line!r} within {timeout_s} s; got {self.lines()[-10:]}")
            t = found()
        assert t is not None
        return t

    def lines(self) -> list[str]:
        """Every message received so far."""
        return [m for _, m in self.messages]

    def close(self) -> None:
        """Stop the reader and close the socket."""
        self._closing.set()
        self._thread.join(5.0)
        self.sock.close()


class DaemonProcess(Daemon):
    """The shared daemon harness, plus signals and log events by name."""

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit; returns the status."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log events (only those called ``name``, if given)."""
        return [e for e in self.log_events() if name is None or e.get("event") == name]


def mirror_equals(root: Path, mirror: Path) -> bool:
    """Whether ``mirror`` holds every file of ``root`` (JSONL up to the last newline)."""
    for path in root.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = path.relative_to(root)
        data = path.read_bytes()
        if path.suffix == ".jsonl":
            data = data[: data.rfind(b"\n") + 1]
        other = mirror / rel
        if not other.is_file() or other.read_bytes() != data:
            return False
    return True
