"""Byte-level storage: one contract, three backends (local directory, S3, GCS).

See :mod:`evalsyncd.storage._base` for the contract every backend keeps.
This package knows nothing of evaluations or of the daemon.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from evalsyncd.storage._base import AsyncStorage, Storage, StorageStat, check_key, storage_join
from evalsyncd.storage.gcs import GCSStorage
from evalsyncd.storage.local import LocalStorage
from evalsyncd.storage.s3 import S3Storage

__all__ = [
    "AnyStorage",
    "AsyncStorage",
    "GCSStorage",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageStat",
    "check_key",
    "storage_from_uri",
    "storage_join",
]

AnyStorage = LocalStorage | S3Storage | GCSStorage
"""The concrete backends: each implements both ``Storage`` and ``AsyncStorage``."""


def storage_from_uri(uri: str | Path, **kwargs: Any) -> AnyStorage:
    """Open the backend a URI names (configuration only: no I/O happens here).

    - a plain path or ``file:///path`` gives :class:`LocalStorage`;
    - ``s3://bucket/prefix`` gives :class:`S3Storage`; the endpoint comes from
      ``endpoint_url=`` or else the ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
      environment variables (the AWS SDKs' standard names);
    - ``gs://bucket/prefix`` gives :class:`GCSStorage` (``STORAGE_EMULATOR_HOST``
      is honoured by the client).

    Args:
        uri: the location.
        **kwargs: passed to the backend's constructor.

    Raises:
        ValueError: unknown scheme, or a cloud URI without a bucket.
    """
    if isinstance(uri, Path):
        return LocalStorage(uri, **kwargs)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return LocalStorage(uri, **kwargs)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{uri!r}: file URLs must name a local path (file:///dir)")
        return LocalStorage(unquote(parts.path), **kwargs)
    if scheme in ("s3", "gs"):
        bucket, _, prefix = uri.split("://", 1)[1].partition("/")
        if not bucket:
            raise ValueError(f"{uri!r}: no bucket name")
        if scheme == "s3":
            if kwargs.get("endpoint_url") is None:
                kwargs["endpoint_url"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
                    "AWS_ENDPOINT_URL"
                )
            return S3Storage(bucket, prefix, **kwargs)
        return GCSStorage(bucket, prefix, **kwargs)
    raise ValueError(
        f"{uri!r}: unsupported scheme {scheme!r} (use a path, file://, s3:// or gs://)"
    )
