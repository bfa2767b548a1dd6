"""evalsyncd: keep ML evaluation runs mirrored to S3 and GCS without slowing their writers."""

from __future__ import annotations

__version__ = "0.1.0"
