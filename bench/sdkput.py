"""The SDK's ceiling for measurement 3: ``python -m bench.sdkput ENDPOINT ROOT PREFIX INFLIGHT``.

Puts every file under ``ROOT`` to ``s3://bench/PREFIX/{relative path}`` with
aiobotocore, ``INFLIGHT`` PutObject calls at a time, on one client configured
as ``S3Storage`` configures its own (path-style, standard retries, 3 attempts,
its ``User-Agent``, ``ChecksumAlgorithm="CRC32C"``), and nothing else: no journal, no plan, no
catalog. It is what one Python process with this SDK can do on the machine,
the ceiling for ``evalsyncd sync --once``. Imports only the SDK (never
``evalsyncd``), and its wall time includes its start-up, as the other tools'.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

__all__ = ["main"]


async def _put_all(endpoint: str, files: list[tuple[str, bytes]], inflight: int) -> int:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession

    config = AioConfig(
        region_name="us-east-1",
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": 3, "mode": "standard"},
        max_pool_connections=max(32, inflight),
        user_agent="evalsyncd",
    )
    sem = asyncio.Semaphore(inflight)
    async with AioSession().create_client("s3", endpoint_url=endpoint, config=config) as client:

        async def put(key: str, body: bytes) -> None:
            async with sem:
                await client.put_object(
                    Bucket="bench", Key=key, Body=body, ChecksumAlgorithm="CRC32C"
                )

        await asyncio.gather(*(put(k, b) for k, b in files))
    return len(files)


def main(argv: list[str] | None = None) -> int:
    """Put the tree; prints the number of objects."""
    endpoint, root, prefix, inflight = argv or sys.argv[1:]
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    base = Path(root)
    files = [
        (f"{prefix}/{p.relative_to(base).as_posix()}", p.read_bytes())
        for p in sorted(base.rglob("*"))
        if p.is_file()
    ]
    print(asyncio.run(_put_all(endpoint, files, int(inflight))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
