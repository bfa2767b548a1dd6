"""Byte-level storage: one contract, three backends (local directory, S3, GCS).

See :mod:`evalsyncd.storage._base` for the contract every backend keeps.
This package knows nothing of evaluations or of the daemon.

The cloud backends (``S3Storage``, ``GCSStorage``, and ``AnyStorage`` which
names them) are imported on first use (PEP 562), so a reader of a local
directory never loads aiobotocore or gcloud-aio.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from evalsyncd.storage._base import (
    AsyncInternalArea,
    AsyncStorage,
    Backend,
    InternalArea,
    Storage,
    StorageStat,
    SupportsChild,
    check_key,
    storage_join,
)
from evalsyncd.storage.local import LocalStorage
from evalsyncd.storage.urls import SCHEMES, StorageURL, parse_url

if TYPE_CHECKING:
    from evalsyncd.storage.gcs import GCSStorage
    from evalsyncd.storage.s3 import S3Storage

__all__ = [
    "SCHEMES",
    "AnyStorage",
    "AsyncInternalArea",
    "AsyncStorage",
    "Backend",
    "GCSStorage",
    "InternalArea",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageStat",
    "StorageURL",
    "SupportsChild",
    "check_key",
    "parse_url",
    "storage_from_uri",
    "storage_join",
]

if TYPE_CHECKING:
    AnyStorage: TypeAlias = LocalStorage | S3Storage | GCSStorage
    """The concrete backends: each implements both ``Storage`` and ``AsyncStorage``."""


def __getattr__(name: str) -> Any:
    if name == "S3Storage":
        from evalsyncd.storage.s3 import S3Storage

        return S3Storage
    if name == "GCSStorage":
        from evalsyncd.storage.gcs import GCSStorage

        return GCSStorage
    if name == "AnyStorage":
        from evalsyncd.storage.gcs import GCSStorage
        from evalsyncd.storage.s3 import S3Storage

        return LocalStorage | S3Storage | GCSStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def storage_from_uri(uri: str | Path, **kwargs: Any) -> AnyStorage:
    """Open the backend a URI names (configuration only: no I/O happens here).

    - a plain path or ``file:///path`` gives :class:`LocalStorage`;
    - ``s3://bucket/prefix`` gives :class:`S3Storage`; the endpoint comes from
      ``endpoint_url=`` or else the ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
      environment variables (the AWS SDKs' standard names);
    - ``gs://bucket/prefix`` gives :class:`GCSStorage` (``STORAGE_EMULATOR_HOST``
      is honoured by the client).

    The schemes are those of :data:`evalsyncd.storage.urls.SCHEMES`.

    Args:
        uri: the location.
        **kwargs: passed to the backend's constructor.

    Raises:
        ValueError: unknown scheme, or a cloud URI without a bucket (the message
            names the URI and the allowed schemes).
    """
    return parse_url(uri).open(**kwargs)
