"""Shared fixtures: real S3 (SeaweedFS) and GCS (fake-gcs-server) servers on loopback.

The servers start once per session on free ports (in a temporary directory) and
are stopped by PID at the end. Each test gets its own key prefix in a shared
bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from evalsyncd.storage import AnyStorage, GCSStorage, LocalStorage, S3Storage
from evalsyncd.storage.memory import MemoryStorage, drop_bucket
from evalsyncd.testing.servers import FakeGCSServer, MotoS3Server, SeaweedS3Server
from tests.helpers import wait_for

S3_BUCKET = "evalsyncd-test"
GCS_BUCKET = "evalsyncd-test"

# Variables that could point a test at a real cloud account or change SDK behaviour.
_ISOLATED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
)

if TYPE_CHECKING:
    from tests.reliability import RelEnv


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    """A SeaweedFS S3 server for the session, with bucket ``evalsyncd-test``."""
    server = SeaweedS3Server(tmp_path_factory.mktemp("servers") / "seaweed").start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3Server]:
    """moto's S3 server for the session (a second, laxer S3), with bucket ``evalsyncd-test``."""
    server = MotoS3Server(tmp_path_factory.mktemp("servers") / "moto").start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCSServer]:
    """A fake-gcs-server for the session, with bucket ``evalsyncd-test``."""
    server = FakeGCSServer(tmp_path_factory.mktemp("servers") / "fakegcs").start()
    try:
        server.create_bucket(GCS_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads the developer's cloud credentials or config."""
    saved = {k: os.environ.pop(k) for k in _ISOLATED_ENV if k in os.environ}
    home = tmp_path_factory.mktemp("home")
    os.environ["AWS_CONFIG_FILE"] = str(home / "aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(home / "aws-credentials")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        yield
    finally:
        for k in (*_ISOLATED_ENV, "AWS_EC2_METADATA_DISABLED"):
            os.environ.pop(k, None)
        os.environ.update(saved)


@pytest.fixture(scope="session")
def cloud_env(s3_server: SeaweedS3Server, gcs_server: FakeGCSServer) -> dict[str, str]:
    """Environment that points SDKs (and daemon subprocesses) at the test servers.

    Set for the whole session once requested: credentials for SeaweedFS and
    ``STORAGE_EMULATOR_HOST`` for fake-gcs-server.
    """
    env = {**s3_server.client_env(), **gcs_server.client_env()}
    os.environ.update(env)
    return env


@pytest.fixture
def unique_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix no other test uses: ``t/{test name}-{random}``."""
    # No backslashes: SeaweedFS stores "\\" as "/" (test ids escape non-ASCII as "\\xfc").
    name = (
        request.node.name.replace("[", "-")
        .replace("]", "")
        .replace("/", "-")
        .replace("\\", "-")[:60]
    )
    return f"t/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_storage(
    cloud_env: dict[str, str], s3_server: SeaweedS3Server, unique_prefix: str
) -> Iterator[S3Storage]:
    """An ``S3Storage`` on the test server under a fresh prefix."""
    storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=s3_server.endpoint_url)
    with storage:
        yield storage


@pytest.fixture
def moto_storage(
    cloud_env: dict[str, str], moto_server: MotoS3Server, unique_prefix: str
) -> Iterator[S3Storage]:
    """An ``S3Storage`` on moto's server under a fresh prefix."""
    storage = S3Storage(S3_BUCKET, unique_prefix, endpoint_url=moto_server.endpoint_url)
    with storage:
        yield storage


@pytest.fixture
def gcs_storage(cloud_env: dict[str, str], unique_prefix: str) -> Iterator[GCSStorage]:
    """A ``GCSStorage`` on the test server under a fresh prefix."""
    storage = GCSStorage(GCS_BUCKET, unique_prefix)
    with storage:
        yield storage


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    """A ``LocalStorage`` in a fresh temporary directory."""
    return LocalStorage(tmp_path / "store")


@pytest.fixture
def memory_storage(unique_prefix: str) -> Iterator[MemoryStorage]:
    """A ``MemoryStorage`` on a fresh in-memory bucket (dropped afterwards)."""
    bucket = f"test-{uuid.uuid4().hex}"
    storage = MemoryStorage(bucket, unique_prefix)
    with storage:
        yield storage
    drop_bucket(bucket)


@pytest.fixture(params=["local", "s3", "gcs"])
def storage(request: pytest.FixtureRequest) -> AnyStorage:
    """Each backend in turn: the contract suites run once per backend."""
    fixture: AnyStorage = request.getfixturevalue(f"{request.param}_storage")
    return fixture


def _lives_with_the_process(t: threading.Thread) -> bool:
    """The storage bridge's loop thread and its worker threads (``asyncio_N``, daemon
    threads as the bridge that starts them) live as long as the process, by design."""
    return t.name == "evalsyncd-storage-bridge" or (t.daemon and t.name.startswith("asyncio_"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-seed",
        type=int,
        default=None,
        help="replay one seed of the simulation (tests/test_simulation.py)",
    )


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    """A test must not leave threads behind, daemon threads included (the watcher's, a
    proxy's, a test's own helpers); only the process-wide storage bridge may outlive it."""
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not _lives_with_the_process(t)
        ]

    try:
        wait_for(lambda: not leaked(), timeout_s=5.0, what="threads to end")
    except AssertionError:
        raise AssertionError(f"threads leaked: {leaked()}") from None


@pytest.fixture
def rel(
    tmp_path: Path,
    cloud_env: dict[str, str],
    s3_server: SeaweedS3Server,
    gcs_server: FakeGCSServer,
    unique_prefix: str,
) -> Iterator[RelEnv]:
    """A reliability test's root, state directory and destinations (``tests.reliability``)."""
    from tests.reliability import RelEnv

    e = RelEnv(tmp_path, s3_server.endpoint_url, gcs_server.endpoint_url, unique_prefix)
    yield e
    e.close()
