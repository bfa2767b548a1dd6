"""Which cloud backend an object is, without importing the backends that are not in use.

``isinstance(storage, GCSStorage)`` needs ``evalsyncd.storage.gcs``, which imports
gcloud-aio (about 0.1 s of CPU). A ``GCSStorage`` exists only once its module was
imported, so these checks look the class up among the modules already loaded: the
daemon's probe and reaper of an S3 destination (at start, before its first pass)
never load the GCS SDK, nor the S3 SDK for a GCS destination.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from evalsyncd.storage.gcs import GCSStorage
    from evalsyncd.storage.s3 import S3Storage

__all__ = ["is_gcs", "is_s3"]


def _is(obj: object, module: str, name: str) -> bool:
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return isinstance(cls, type) and isinstance(obj, cls)


def is_s3(obj: object) -> TypeGuard[S3Storage]:
    """Whether ``obj`` is an ``S3Storage`` (a subclass included); imports nothing."""
    return _is(obj, "evalsyncd.storage.s3", "S3Storage")


def is_gcs(obj: object) -> TypeGuard[GCSStorage]:
    """Whether ``obj`` is a ``GCSStorage`` (a subclass included); imports nothing."""
    return _is(obj, "evalsyncd.storage.gcs", "GCSStorage")
