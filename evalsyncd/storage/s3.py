"""``S3Storage``: the storage contract on Amazon S3 (and S3-compatible servers), via aioboto3.

(Under construction.)
"""

from __future__ import annotations

from evalsyncd.storage._cloud import CloudStorage

__all__ = ["S3Storage"]


class S3Storage(CloudStorage):
    """S3 backend (under construction)."""

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
    ) -> None:
        super().__init__(bucket, prefix)
        self.endpoint_url = endpoint_url
        self.region = region
        self.profile = profile
