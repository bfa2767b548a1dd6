"""``GCSStorage``: the storage contract on Google Cloud Storage, via gcloud-aio-storage.

(Under construction.)
"""

from __future__ import annotations

from evalsyncd.storage._cloud import CloudStorage

__all__ = ["GCSStorage"]


class GCSStorage(CloudStorage):
    """GCS backend (under construction)."""

    scheme = "gs"
