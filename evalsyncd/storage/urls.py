"""The one place storage URLs are parsed: scheme -> backend.

::

    "s3://bucket/prefix"   -> S3Storage(bucket, prefix, ...)
    "gs://bucket/prefix"   -> GCSStorage(bucket, prefix, ...)
    "file:///dir", "/dir"  -> LocalStorage(dir, ...)      (a bare path only when not strict)

:data:`SCHEMES` is the registry; :func:`parse_url` turns a URL into a
:class:`StorageURL` (no I/O, no SDK import) and :meth:`StorageURL.open`
builds its backend (the cloud SDKs are imported then). The daemon's per-scheme
settings (``evalsyncd.config``) are keyed by the same scheme names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from evalsyncd.storage.local import LocalStorage

if TYPE_CHECKING:
    from evalsyncd.storage.gcs import GCSStorage
    from evalsyncd.storage.s3 import S3Storage

__all__ = ["SCHEMES", "Scheme", "StorageURL", "parse_url"]

_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
"""A URL scheme as RFC 3986 (and ``urllib.parse.urlsplit``) reads it."""


@dataclass(frozen=True)
class StorageURL:
    """A parsed storage location.

    Attributes:
        url: the URL (or path) as given.
        scheme: the registry key: ``"s3"``, ``"gs"`` or ``"file"`` (bare paths too).
        bucket: the bucket of a cloud URL; ``""`` for local directories.
        path: the key prefix of a cloud URL as written (``""`` for the bucket
            root), or the directory of a local one.
        bare: a directory path written without a scheme.
    """

    url: str
    scheme: str
    bucket: str = ""
    path: str = ""
    bare: bool = False

    def open(self, **options: Any) -> LocalStorage | S3Storage | GCSStorage:
        """The backend of this location, configured only (no I/O).

        Args:
            **options: keyword arguments of the backend's constructor.

        Raises:
            ValueError: invalid options (see the backend).
            TypeError: an option the backend does not take.
        """
        return SCHEMES[self.scheme].open(self, options)


def _open_file(u: StorageURL, options: dict[str, Any]) -> LocalStorage:
    return LocalStorage(u.path, **options)


def _open_s3(u: StorageURL, options: dict[str, Any]) -> S3Storage:
    from evalsyncd.storage.s3 import S3Storage

    if options.get("endpoint_url") is None:
        # the AWS SDKs' standard names
        options["endpoint_url"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
    return S3Storage(u.bucket, u.path, **options)


def _open_gs(u: StorageURL, options: dict[str, Any]) -> GCSStorage:
    from evalsyncd.storage.gcs import GCSStorage

    # STORAGE_EMULATOR_HOST is honoured by the client itself
    return GCSStorage(u.bucket, u.path, **options)


@dataclass(frozen=True)
class Scheme:
    """One registered scheme.

    Attributes:
        name: the scheme, lower case (``s3``).
        form: how a URL of it is written, for messages (``s3://bucket/prefix``).
        cloud: whether it names a bucket.
        open: builds the backend from a parsed URL and constructor options.
    """

    name: str
    form: str
    cloud: bool
    open: Callable[[StorageURL, dict[str, Any]], LocalStorage | S3Storage | GCSStorage]


SCHEMES: dict[str, Scheme] = {
    "s3": Scheme("s3", "s3://bucket/prefix", True, _open_s3),
    "gs": Scheme("gs", "gs://bucket/prefix", True, _open_gs),
    "file": Scheme("file", "file:///dir", False, _open_file),
}
"""The registry: scheme -> backend."""


def _allowed(strict: bool) -> str:
    forms = [s.form for s in SCHEMES.values()]
    if not strict:
        forms.append("a directory path")
    return ", ".join(forms[:-1]) + " or " + forms[-1]


def parse_url(url: str | Path, *, strict: bool = False) -> StorageURL:
    """Parse a storage URL (no I/O).

    Args:
        url: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///dir``
            (``file://localhost/dir`` too unless strict) or, unless strict, a
            directory path (a :class:`~pathlib.Path` always is one).
        strict: accept only URLs, and ``file:`` URLs only as ``file:///abs/dir``
            (what a configuration file must say).

    Returns:
        The parsed location.

    Raises:
        ValueError: the message names the URL and, for an unknown scheme, the
            allowed ones: an unknown scheme, a cloud URL without a bucket, a
            ``file:`` URL naming another host, or (strict) a path.
    """
    if isinstance(url, Path):
        return StorageURL(str(url), "file", path=str(url), bare=True)
    m = _SCHEME_RE.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        if strict:
            raise ValueError(f"{url!r}: not a URL; use {_allowed(strict)}")
        return StorageURL(url, "file", path=url, bare=True)
    entry = SCHEMES.get(scheme)
    if entry is None:
        raise ValueError(f"{url!r}: unsupported scheme {scheme!r}; use {_allowed(strict)}")
    if entry.cloud:
        _, sep, rest = url.partition("://")
        bucket, _, prefix = rest.partition("/")
        if not sep or not bucket:
            raise ValueError(f"{url!r}: no bucket name; use {entry.form}")
        if ".." in prefix.split("/") or "." in prefix.split("/"):
            raise ValueError(f"{url!r}: the prefix escapes the bucket ('.' or '..' segment)")
        return StorageURL(url, entry.name, bucket=bucket, path=prefix)
    if strict and not url.startswith("file:///"):
        raise ValueError(f"{url!r}: file URLs must be absolute: file:///path/to/dir")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: file URLs must name a local path (file:///dir)")
    return StorageURL(url, "file", path=unquote(parts.path))
