"""The storage contract (evalsyncd.storage._base), run against every backend.

The tests are :class:`evalsyncd.testing.contract.StorageContract`; each class
here gives it one backend: ``LocalStorage``, ``S3Storage`` against SeaweedFS and moto's server,
``GCSStorage`` against fake-gcs-server, and ``MemoryStorage``.
"""

from __future__ import annotations

import pytest

from evalsyncd.storage import GCSStorage, LocalStorage, S3Storage
from evalsyncd.storage.memory import MemoryStorage
from evalsyncd.testing.contract import StorageContract


class TestLocalStorage(StorageContract):
    """The contract on a local directory."""

    @pytest.fixture
    def storage(self, local_storage: LocalStorage) -> LocalStorage:
        return local_storage


class TestS3Storage(StorageContract):
    """The contract on S3 (SeaweedFS on loopback)."""

    @pytest.fixture
    def storage(self, s3_storage: S3Storage) -> S3Storage:
        return s3_storage


class TestS3StorageOnMoto(StorageContract):
    """The contract on S3 (moto's server on loopback: a second, laxer S3 implementation)."""

    @pytest.fixture
    def storage(self, moto_storage: S3Storage) -> S3Storage:
        return moto_storage


class TestGCSStorage(StorageContract):
    """The contract on GCS (fake-gcs-server on loopback)."""

    @pytest.fixture
    def storage(self, gcs_storage: GCSStorage) -> GCSStorage:
        return gcs_storage


class TestMemoryStorage(StorageContract):
    """The contract on the in-memory backend."""

    url_schemes = ("memory",)

    @pytest.fixture
    def storage(self, memory_storage: MemoryStorage) -> MemoryStorage:
        return memory_storage
