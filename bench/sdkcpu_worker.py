"""One variant of measurement 8 in its own process: ``python sdkcpu_worker.py SPEC_JSON``.

Run by :mod:`bench.sdkcpu` with the interpreter of the venv under test (the
project's, or the aiobotocore 3.x one the bench creates), so it imports only
the standard library at the top and the SDK inside :func:`_main`; it must not
import ``evalsyncd`` or ``bench``. Prints one JSON object on its last stdout line.

The spec (a JSON object):

- ``lib``: ``"aioboto3"`` (``aioboto3.Session().client``) or ``"aiobotocore"``
  (``aiobotocore.session.get_session().create_client``);
- ``config``: extra ``AioConfig`` keyword arguments, on top of region
  ``us-east-1``, path-style addressing and ``S3Storage``'s retry settings
  (standard mode, 3 attempts);
- ``checksum``: ``"sdk"`` (the SDK decides), ``"sdk-crc32c"``
  (``ChecksumAlgorithm="CRC32C"``: the SDK computes it, as ``S3Storage`` does
  today) or ``"own-crc32c"`` (``ChecksumCRC32C`` computed here with the
  ``crc32c`` package on every call);
- ``endpoint``, ``bucket``, ``prefix``; ``n`` PutObject calls of ``size`` bytes,
  ``inflight`` at a time, after ``warmup`` calls that are not measured;
- ``verify``: before measuring, send a wrong ``ChecksumCRC32C`` (must be
  rejected, and no object left) and a right one (must be stored with it);
- ``profile``: a path for a pyinstrument text profile of the measured phase.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import resource
import sys
import time
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _crc32c_b64(data: bytes) -> str:
    """``x-amz-checksum-crc32c``: base64 of the big-endian CRC32C of ``data``."""
    import crc32c

    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode("ascii")


def _client(spec: dict[str, Any]) -> Any:
    from aiobotocore.config import AioConfig

    config = AioConfig(
        region_name="us-east-1",
        s3={"addressing_style": "path"},
        retries={"total_max_attempts": 3, "mode": "standard"},  # as S3Storage
        **spec.get("config", {}),
    )
    kwargs = {"endpoint_url": spec["endpoint"], "region_name": "us-east-1", "config": config}
    if spec["lib"] == "aioboto3":
        import aioboto3

        return aioboto3.Session().client("s3", **kwargs)
    from aiobotocore.session import get_session

    return get_session().create_client("s3", **kwargs)


async def _verify(client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    """Does the server check ``ChecksumCRC32C``? A wrong value, then a right one."""
    from botocore.exceptions import ClientError

    data = b"evalsyncd checksum probe " * 36
    out: dict[str, Any] = {}
    bad_key = f"{prefix}/probe-wrong"
    wrong = _crc32c_b64(data + b"x")
    try:
        await client.put_object(Bucket=bucket, Key=bad_key, Body=data, ChecksumCRC32C=wrong)
        out["wrong_rejected"] = False
    except ClientError as exc:
        out["wrong_rejected"] = True
        out["wrong_error"] = exc.response.get("Error", {}).get("Code")
        out["wrong_status"] = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    try:
        await client.head_object(Bucket=bucket, Key=bad_key)
        out["wrong_left_object"] = True
    except ClientError:
        out["wrong_left_object"] = False
    good_key = f"{prefix}/probe-right"
    right = _crc32c_b64(data)
    await client.put_object(Bucket=bucket, Key=good_key, Body=data, ChecksumCRC32C=right)
    head = await client.head_object(Bucket=bucket, Key=good_key, ChecksumMode="ENABLED")
    out["right_accepted"] = True
    out["right_stored_checksum"] = head.get("ChecksumCRC32C")
    out["right_checksum_matches"] = head.get("ChecksumCRC32C") == right
    return out


async def _main(spec: dict[str, Any]) -> dict[str, Any]:
    bucket, prefix = spec["bucket"], spec["prefix"]
    n, inflight, size, warmup = spec["n"], spec["inflight"], spec["size"], spec["warmup"]
    mode = spec["checksum"]
    base = bytes(range(256)) * (size // 256 + 1)
    retries = 0

    async with _client(spec) as client:

        async def put(key: str, i: int) -> None:
            nonlocal retries
            data = i.to_bytes(8, "big") + base[: size - 8]
            kwargs: dict[str, Any] = {}
            if mode == "own-crc32c":
                kwargs["ChecksumCRC32C"] = _crc32c_b64(data)
            elif mode == "sdk-crc32c":
                kwargs["ChecksumAlgorithm"] = "CRC32C"
            resp = await client.put_object(Bucket=bucket, Key=key, Body=data, **kwargs)
            retries += resp["ResponseMetadata"].get("RetryAttempts", 0)

        async def drive(count: int, key_prefix: str) -> None:
            it = iter(range(count))

            async def lane() -> None:
                for i in it:
                    await put(f"{key_prefix}/{i:06d}", i)

            await asyncio.gather(*(lane() for _ in range(inflight)))

        verify = await _verify(client, bucket, prefix) if spec.get("verify") else None
        await drive(warmup, f"{prefix}/warmup")
        retries = 0
        profiler = None
        if spec.get("profile"):
            from pyinstrument import Profiler

            profiler = Profiler(async_mode="disabled")
            profiler.start()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await drive(n, f"{prefix}/run")
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        profile_text = None
        if profiler is not None:
            profiler.stop()
            profile_text = profiler.output_text(unicode=False, color=False, show_all=True)
        stored = 0
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/run/"):
            stored += len(page.get("Contents", ()))

    import botocore

    return {
        "n": n,
        "inflight": inflight,
        "size": size,
        "cpu_s": cpu_s,
        "user_s": r1.ru_utime - r0.ru_utime,
        "sys_s": r1.ru_stime - r0.ru_stime,
        "wall_s": wall_s,
        "cpu_ms_per_put": cpu_s * 1000 / n,
        "wall_ms_per_put": wall_s * 1000 / n,
        "retries": retries,
        "objects_stored": stored,
        "verify": verify,
        "profile_text": profile_text,
        "versions": {
            "python": sys.version.split()[0],
            "botocore": botocore.__version__,
            "aiobotocore": _version("aiobotocore"),
            "aioboto3": _version("aioboto3") if spec["lib"] == "aioboto3" else None,
            "aiohttp": _version("aiohttp"),
            "awscrt": _version("awscrt"),
        },
    }


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = asyncio.run(_main(spec))
    text = result.pop("profile_text")
    if text is not None:
        with open(spec["profile"], "w") as f:
            f.write(text)
    print(json.dumps(result))
